"""A ladder of snapshots: one per ``snapshot_every`` versions of an execution, kept beside its
latest snapshot, so that loading it *at any version* starts near that version.

The backend's snapshot store keeps one snapshot per key (the newest), which serves loading
an execution as it is now. Loading it as it was at an earlier version (``state_of(...,
at_version=N)``, ``describe``, ``checkpoints_of``, the web UI's version scrubber) would
otherwise fold every event from the start up to N. Each time a commit crosses a multiple of
``snapshot_every``, the store also keeps the snapshot under the key of that *rung*
(``{execution_id}.v{version // snapshot_every}``); a load at N reads the snapshot of N's
rung, or of the nearest rung below that has one (a commit of many events jumps over rungs),
and folds only the events after it: about the events of one commit plus
``snapshot_every``, whatever N. Like every snapshot, a rung is
derived data: one that cannot be read is ignored and the log is folded instead.
"""

from __future__ import annotations

__all__ = ["RUNG_SEARCH", "rung_key", "rung_keys"]

#: how many rungs a load looks down through for the nearest snapshot (a point read each):
#: a commit can jump over rungs (the recorder buffers up to 1,000 events, which is 10 rungs
#: at ``snapshot_every=100``); past them the load falls back to the older snapshots
RUNG_SEARCH = 12


def rung_key(execution_id: str, version: int, every: int) -> str:
    """Where the snapshot taken at ``version`` is kept on the ladder."""
    return f"{execution_id}.v{version // every}"


def rung_keys(execution_id: str, at_version: int, every: int, above: int = 0) -> list[str]:
    """The keys of the rungs that may hold the nearest snapshot at or below ``at_version``
    and newer than version ``above`` (a snapshot already found), nearest first: at most
    :data:`RUNG_SEARCH` of them."""
    rung = at_version // every
    lowest = max(rung - RUNG_SEARCH + 1, above // every, 1)
    return [f"{execution_id}.v{r}" for r in range(rung, lowest - 1, -1)]
