"""The embedded backend: one SQLite file in WAL mode, shareable by processes on one machine.

:class:`SQLiteBackend` is composed of parts, each an object around the one owner of the
file's connections and writer thread (:mod:`.connection`):

- :mod:`.log`: the event log, written by group commit (concurrent appends of one event loop
  share one transaction); :mod:`.commits` checks and writes a batch's commits;
- :mod:`.queue`: the work queue and its leases;
- :mod:`.inbox`: the executions' inboxes;
- :mod:`.kv`: the global key-value store, with TTL and revisions;
- :mod:`.meta`: published step definitions and snapshots;
- :mod:`.writer`: the one long-lived thread that runs every write in order;
- :mod:`.schema`: the tables.
"""

from stepsource.adapters.sqlite.backend import SQLiteBackend

__all__ = ["SQLiteBackend"]
