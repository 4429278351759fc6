"""What this process appended, handed to the executions index without reading it back.

A worker's read-model runner folds every event of the log into the executions index, and
most of those events were appended by this very process a moment before. Reading them back
(a query of the log, then each record checked and the indexed ones decoded) was about a
quarter of a busy worker's CPU: 50 empty steps at a time ran about 20% faster with the runner
off. The execution store tells the feed of each commit once it is durable (its events, as
the domain events the recorder built, and the position of its last one); a catch-up whose
next page starts exactly where a commit of the feed starts takes the page from the feed,
commit after commit while they follow each other, and reads the log for anything else:

- another process's commits, and positions a backend skipped;
- a commit whose caller has not told the feed yet (group commit wakes its callers in any
  order): the log is read from there, and the feed's entries behind the index are dropped;
- a commit inside a transaction of the backend's that commits later (a transactional step):
  its positions are not final until then, so the store does not feed it
  (:data:`stepsource.engine.store.UNCOMMITTED`).

Only where a commit's events take consecutive positions (``Backend.dense_positions``), so
that the last position and the number of events give each event's position. The index folds
a fed page exactly as it folds the same records read from the log: the indexed events are
the same objects a decode builds, and the others become :class:`Touched` runs with the
same execution, version and time (``tests/test_index_feed.py``). The feed holds at most
:data:`MAX_FED_EVENTS` events: a commit that would take it past that is not kept (the index
reads it from the log), so a worker appending faster than its runner folds holds little, and
what it holds are the commits the runner needs first.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepsource.aggregates import events as ev
from stepsource.engine.index_reading import IndexBatch, Page
from stepsource.projections.summaries import INDEXED_EVENTS, Touched

__all__ = ["MAX_FED_EVENTS", "IndexFeed"]

#: events the feed holds at most: a few runner rounds of a busy worker's commits (about
#: 0.2 s at 10,000 events/s), about 1.5 MB (an event held costs about 730 bytes)
MAX_FED_EVENTS = 2048

_INDEXED = frozenset(INDEXED_EVENTS)


class IndexFeed:
    """Durable commits of this process not yet folded, keyed by their first position."""

    def __init__(self, limit: int = MAX_FED_EVENTS) -> None:
        self.limit = limit
        #: first position -> (stream id, the commit's events)
        self._commits: dict[int, tuple[str, Sequence[ev.ExecutionEvent]]] = {}
        self._events = 0
        #: the position up to which the index took pages (from here or from the log): a
        #: commit told later than that is not kept
        self._behind = 0
        #: pages taken from the feed so far (tests and diagnostics)
        self.pages = 0

    def __len__(self) -> int:
        """Events held now."""
        return self._events

    def appended(self, stream_id: str, last: int, events: Sequence[ev.ExecutionEvent]) -> None:
        """A commit of ``events`` to ``stream_id`` is durable, its last event at ``last``."""
        if not events or last <= self._behind or self._events + len(events) > self.limit:
            return  # folded already, or full: the index reads this one from the log
        self._commits[last - len(events) + 1] = (stream_id, events)
        self._events += len(events)

    def clear(self) -> None:
        """Forget everything held (the runner stopped: no catch-up takes pages from here
        until it runs again, and the store tells nobody meanwhile)."""
        self._commits.clear()
        self._events = 0

    def read(self, end: int) -> None:
        """The index took the page up to position ``end`` from the log: drop what it held
        of it."""
        self._behind = max(self._behind, end)
        self._drop_behind(end)

    def page(self, after: int, size: int, target: int) -> Page | None:
        """The page of records after position ``after`` as the index folds them, taken from
        the feed (at most ``size`` events unless one commit holds more; none past
        ``target``); None if the feed does not hold the record right after ``after``."""
        commits = self._commits
        entry = commits.get(after + 1)
        if entry is None:
            self._drop_behind(after)
            return None
        first_stream = entry[0]
        batch: IndexBatch = []
        append = batch.append
        position = after
        count = 0
        while entry is not None and (count == 0 or count + len(entry[1]) <= size):
            stream, events = entry
            end = position + len(events)
            if end > target:
                break
            del commits[position + 1]
            self._events -= len(events)
            for offset, event in enumerate(events, start=position + 1):
                if type(event) in _INDEXED:
                    append((offset, event))
                    continue
                previous = batch[-1][1] if batch else None
                if (
                    type(previous) is Touched
                    and previous.originator_id == stream
                    and batch[-1][0] == offset - 1
                ):
                    batch[-1] = (
                        offset,
                        Touched(
                            stream, event.originator_version, event.timestamp, previous.events + 1
                        ),
                    )
                else:
                    append((offset, Touched(stream, event.originator_version, event.timestamp)))
            position = end
            count += len(events)
            entry = commits.get(position + 1)
        if count == 0:
            return None
        self._behind = max(self._behind, position)
        self.pages += 1
        return Page(position, count, first_stream, batch)

    def _drop_behind(self, after: int) -> None:
        """Drop the commits the index has folded already (read from the log meanwhile, or
        told after the index had read them)."""
        commits = self._commits
        for first in [first for first in commits if first <= after]:
            self._events -= len(commits.pop(first)[1])
