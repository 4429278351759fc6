"""The SQLite backend's event log: the ``events`` table, written by group commit.

**Group commit.** Concurrent :meth:`SQLiteLog.append` calls of one event loop share one
transaction, with no background task: each caller puts its commit in a pending list and
takes the loop's write lock; whoever holds the lock first lets every task ready to run add
its commit (one pass of the event loop), then takes *all* pending commits and writes them in
one transaction; a caller whose commit another leader already wrote just returns its
outcome.

**Where a batch is written.** In the event loop's own thread, when the writer thread is idle
and no other process holds the write lock
(:meth:`~stepsource.adapters.sqlite.connection.SQLiteConnection.write_here`): no thread hop.
The loop waits for the statements and the disk meanwhile, which costs less than the hop as long
as writes are quick. A batch of several commits handed to the writer thread lets the loop run
during the fsync, but the thread needs the GIL back after each of its statements, and while the
loop runs other executions' Python it waits up to the interpreter's switch interval (5 ms) each
time: measured on a 2-core machine, such a batch took a median 2 ms to write (its fsync about
0.2 ms) and 0.3 ms to start, and 50 empty executions at a time ran 9 to 13% fewer per second
than with batches written in the loop (interleaved runs). So a batch goes to the writer thread
only when writes are slow (a slow disk, or batches large enough to hold the loop): once the
moving average of how long the batches written in the loop's thread held it
(:attr:`SQLiteLog.write_seconds`, each new batch weighing a quarter, so one slow checkpoint of
the WAL does not count as a slow disk) passes :data:`SLOW_WRITE_SECONDS`, the next
:data:`SLOW_WRITE_BATCHES` batches of several commits go there, then one is tried in the loop
again (:attr:`SQLiteLog.batches_to_writer`). A batch also goes there when the writer thread is
busy or another process holds the write lock (the thread waits for it).

A lone commit of the same stream as the lone batch before it (a handler awaiting one commit
after another) is written at once, without the pass of the event loop that gathers a batch,
:data:`LONE_IN_A_ROW` times in a row at most: then the gathering pass runs, and every other
task with it. Inside the batch each commit is pre-checked (version, lease) and applied under
its own SAVEPOINT (:mod:`~stepsource.adapters.sqlite.commits`), so one caller's conflict
never fails the others'. Sequential awaited appends cost one commit each.

A commit deletes the inbox items it consumed, posts its outbox and applies its queue update
under the same savepoint.
"""

from __future__ import annotations

import sqlite3

import anyio
import anyio.lowlevel

from stepsource.adapters._rules import check_commit
from stepsource.adapters.ports import Commit, RecordedEvent
from stepsource.adapters.sqlite.commits import Refused, apply_commits, stream_version
from stepsource.adapters.sqlite.connection import (
    BUSY,
    Busy,
    LoopState,
    Pending,
    SQLiteConnection,
    transaction,
)
from stepsource.adapters.sqlite.schema import EVENT_COLUMNS, NO_LIMIT
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
    VersionConflictError,
)

__all__ = ["SQLiteLog"]

Outcome = int | VersionConflictError

#: lone commits of one stream written one after another without a pass of the event loop;
#: the next takes the group-commit path, whose checkpoint lets every other task run
LONE_IN_A_ROW = 8

#: batches that held the event loop's thread longer than this on average (seconds) are
#: slow: the loop would do better running other executions meanwhile (the interpreter's
#: default switch interval: what the writer thread may wait for the GIL per statement)
SLOW_WRITE_SECONDS = 0.005

#: batches of several commits that go to the writer thread after a slow write, before one
#: is written in the loop's thread again to measure anew
SLOW_WRITE_BATCHES = 16


def _for_caller(exc: StepsourceError, commit: Commit) -> StepsourceError:
    """A failure of a whole transaction, as one of its callers sees it."""
    return type(exc)(exc.reason, execution_id=commit.stream_id, hint=exc.hint)


class SQLiteLog:
    """Appends (by group commit) and reads of the event log.

    ``commits_written`` counts the append transactions this object committed.
    """

    def __init__(self, connection: SQLiteConnection) -> None:
        self.connection = connection
        self.commits_written = 0
        #: batches of several commits still to hand to the writer thread before one is
        #: written in the event loop's thread again (set when writes there are slow)
        self.batches_to_writer = 0
        #: the moving average of how long batches of several commits held the event loop's
        #: thread (seconds): each new one weighs a quarter
        self.write_seconds = 0.0

    def append_now(self, commit: Commit) -> int | None:
        """The commit written at once if it is a sequential caller's (module docstring): its
        position; None having done nothing (then :meth:`append` it)."""
        check_commit(commit, self.connection.max_commit_bytes, leases=True)
        return self._now(commit, self.connection.loop_state())

    def _now(self, commit: Commit, state: LoopState) -> int | None:
        if (
            state.last_stream == commit.stream_id
            and state.unyielded < LONE_IN_A_ROW
            and not state.pending
            and not state.flushing
        ):
            written = self._write_here([commit])
            if written is not BUSY:  # a sequential caller: written without a pass of the loop
                state.unyielded += 1
                return self._lone_outcome(commit, written)
        return None

    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.connection.max_commit_bytes, leases=True)
        state = self.connection.loop_state()
        position = self._now(commit, state)
        if position is not None:
            return position
        state.unyielded = 0
        item = Pending(commit, anyio.Event())
        state.pending.append(item)
        try:
            while not item.done:
                if not state.flushing:  # no batch in flight: lead one of all that waits
                    await self._flush(state, item.wake)
                    continue
                wake = item.wake
                await wake.wait()  # written, or asked to lead the next batch
                if not item.done and item.wake is wake:
                    item.wake = anyio.Event()
        finally:
            if not item.taken:  # cancelled while waiting: withdraw the commit unwritten
                state.pending.remove(item)
                if state.pending and not state.flushing:  # it may have been asked to lead
                    state.pending[0].wake.set()
        if item.error is not None:
            raise item.error
        if item.position is None:  # the leader died between taking and writing the batch
            raise BackendUnavailableError(
                "the group commit holding this commit was interrupted; nothing was written",
                execution_id=commit.stream_id,
                hint="Retry the append",
            )
        return item.position

    async def _flush(self, state: LoopState, wake: anyio.Event) -> None:
        """Write every pending commit of this loop in one transaction; then wake their
        callers, and the first commit that arrived meanwhile to lead the next batch.
        ``wake`` is the leader's own event: the writer thread sets it when done."""
        state.flushing = True
        batch: list[Pending] = []
        try:
            with anyio.CancelScope(shield=True):
                # every task ready to run adds its commit first (the last batch woke them,
                # or they started together): then one transaction takes them all
                await anyio.lowlevel.checkpoint()
                batch, state.pending = state.pending, []
                # written in this thread unless the disk is slow (module docstring); a lone
                # commit after a lone one always is
                alone = len(batch) == 1 and not state.shared
                state.shared = len(batch) > 1
                state.last_stream = None if state.shared else batch[0].commit.stream_id
                for pending in batch:
                    pending.taken = True
                written = self._write_batch_here(batch, alone)
                if written is BUSY:
                    await self.connection.in_writer(lambda: self._write_batch(batch), state, wake)
                else:
                    if isinstance(written, list):
                        self._settle(batch, written)
                    else:
                        self._failed(batch, written)
        finally:
            state.flushing = False
            for pending in batch:
                pending.done = True
                pending.wake.set()
            if state.pending:
                state.pending[0].wake.set()

    def _write_batch_here(
        self, batch: list[Pending], alone: bool
    ) -> list[Outcome] | StepsourceError | Busy:
        """Write ``batch`` in the event loop's thread, or return BUSY for the writer thread:
        a batch of several commits goes there for :attr:`batches_to_writer` batches once
        writes there are slow (module docstring)."""
        if not alone and self.batches_to_writer > 0:
            self.batches_to_writer -= 1
            return BUSY
        written = self._write_here([pending.commit for pending in batch])
        if written is not BUSY and not alone:
            self.write_seconds += (self.connection.last_write_seconds - self.write_seconds) / 4
            if self.write_seconds > SLOW_WRITE_SECONDS:
                self.batches_to_writer = SLOW_WRITE_BATCHES
        return written

    @staticmethod
    def _lone_outcome(commit: Commit, written: list[Outcome] | StepsourceError) -> int:
        """The position of a commit written alone, or raise what refused it."""
        if not isinstance(written, list):
            raise _for_caller(written, commit)
        (outcome,) = written
        if isinstance(outcome, VersionConflictError):
            raise outcome
        return outcome

    def _write_here(self, commits: list[Commit]) -> list[Outcome] | StepsourceError | Busy:
        """Write commits in the event loop's own thread if the connection allows it now
        (:meth:`SQLiteConnection.write_here`): their outcomes, the transaction's failure,
        or BUSY (nothing done: they go to the writer thread)."""

        def body(conn: sqlite3.Connection) -> list[Outcome]:
            outcomes = apply_commits(conn, commits)
            self.commits_written += 1  # under the writer lock: safe across loops
            return outcomes

        try:
            return self.connection.write_here(body)
        except Refused as refused:  # the only commit: rolled back whole
            return [refused.conflict]
        except StepsourceError as exc:
            return exc

    def _write_batch(self, batch: list[Pending]) -> None:
        outcomes: list[int | VersionConflictError] = []

        def body(conn: sqlite3.Connection) -> None:
            outcomes.extend(apply_commits(conn, [pending.commit for pending in batch]))

        def commit_all(conn: sqlite3.Connection) -> None:
            transaction(conn, body, self.connection.busy_timeout_ms)
            self.commits_written += 1  # under the writer lock: safe across loops

        try:
            self.connection.with_writer(commit_all)
        except (Refused, StepsourceError) as exc:
            self._failed(batch, exc)
            return
        self._settle(batch, outcomes)

    @staticmethod
    def _failed(batch: list[Pending], exc: Refused | StepsourceError) -> None:
        if isinstance(exc, Refused):  # the batch's only commit: rolled back whole
            batch[0].error = exc.conflict
            return
        for pending in batch:  # the whole transaction failed: each caller gets the cause
            pending.error = _for_caller(exc, pending.commit)

    @staticmethod
    def _settle(batch: list[Pending], outcomes: list[Outcome]) -> None:
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, VersionConflictError):
                pending.error = outcome
            else:
                pending.position = outcome

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        upto = NO_LIMIT if to_version is None else to_version
        rows = await self.connection.read(
            lambda conn: conn.execute(
                "SELECT version, topic, data, position FROM events WHERE stream_id = ? "
                "AND version >= ? AND version <= ? ORDER BY version",
                (stream_id, from_version, upto),
            ).fetchall()
        )
        # every row is of ``stream_id``: not read back, the records share the caller's string
        # (a long stream's read makes one string fewer per row, and the codec compares them
        # by identity first); built as RecordedEvent._make builds them, from one tuple each
        new = tuple.__new__
        events = [
            new(RecordedEvent, (stream_id, version, topic, data, position))
            for version, topic, data, position in rows
        ]
        start = max(from_version, 1)
        # ORDER BY version over the UNIQUE (stream_id, version) index: strictly increasing,
        # so the versions run without a gap exactly when the first and last say so
        if events and (events[0].version != start or events[-1].version != start + len(events) - 1):
            raise CorruptLogError(
                f"the stream's versions from {start} have a gap in {self.connection.path}",
                execution_id=stream_id,
                hint="The file was changed outside stepsource: restore it from a backup",
            )
        return events

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if limit <= 0:
            return []
        rows = await self.connection.read(
            lambda conn: conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                (after_position, limit),
            ).fetchall()
        )
        return list(map(RecordedEvent._make, rows))

    async def stream_version(self, stream_id: str) -> int:
        return await self.connection.read(lambda conn: stream_version(conn, stream_id))

    async def max_position(self) -> int:
        def query(conn: sqlite3.Connection) -> int:
            (position,) = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
            return int(position)

        return await self.connection.read(query)
