"""The event log of the PostgreSQL backend: group commit of appends, and reads.

**Group commit.** Concurrent :meth:`EventLog.append` calls of one event loop share one
transaction, with no background task: each caller puts its commit in the loop's pending
list; a caller that finds no batch in flight leads one, taking *all* pending commits and
writing them in one transaction (:func:`~stepsource.adapters.postgres.commits.apply_commits`:
one call of the server-side append function, one round trip, pre-checked under the events
table lock, so one caller's conflict never fails another's);
the callers whose commits it wrote just return their outcomes, and the first commit that
arrived meanwhile leads the next batch. Sequential awaited appends cost one transaction each
(a caller that finds nothing waiting nor in flight writes its commit at once, without the
bookkeeping of a batch of waiting callers).
The write itself is shielded: a commit that was taken into a batch is written (or refused)
whatever happens to its caller; one still waiting when cancelled is withdrawn unwritten.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import psycopg.errors

from stepsource.adapters._rules import check_commit, version_conflict
from stepsource.adapters.ports import Commit, RecordedEvent
from stepsource.adapters.postgres.commits import Outcome, apply_commits
from stepsource.adapters.postgres.pool import Conn, Pool
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
    UsageError,
    VersionConflictError,
)

__all__ = ["EventLog"]

_EVENT_COLUMNS = "stream_id, version, topic, data, position"
_NO_LIMIT = 2**63 - 1


@dataclass(eq=False, slots=True)
class _Pending:
    """One caller's commit waiting for (or written by) a group-commit leader."""

    commit: Commit
    wake: anyio.Event  # set once the batch holding it is written, or to make it lead one
    taken: bool = False
    done: bool = False
    position: int | None = None
    error: StepsourceError | None = None


@dataclass(slots=True)
class _LoopState:
    flushing: bool = False
    shared: bool = False  # the last batch held several commits: callers run concurrently
    pending: list[_Pending] = field(default_factory=list)


class EventLog:
    """Appends (grouped per event loop) and reads of the ``events`` table."""

    def __init__(self, pool: Pool, max_commit_bytes: int) -> None:
        self.pool = pool
        self.max_commit_bytes = max_commit_bytes
        self.transactions = 0  # append transactions committed by this object
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]
        self._states = weakref.WeakKeyDictionary()

    def _state(self) -> _LoopState:
        loop = self.pool.running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        return state

    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.max_commit_bytes, leases=True)
        if self.pool.joined() is not None:  # a transactional step's: in its transaction
            return await self._append_joined(commit)
        state = self._state()
        if not (state.flushing or state.pending or state.shared):
            return await self._append_alone(state, commit)
        item = _Pending(commit, anyio.Event())
        state.pending.append(item)
        try:
            while not item.done:
                if not state.flushing:  # no batch in flight: lead one of all that waits
                    await self._flush(state)
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

    async def _append_alone(self, state: _LoopState, commit: Commit) -> int:
        """No other append waits nor is in flight: lead a batch of this commit alone, as
        :meth:`_flush` would (shielded; a commit that arrives meanwhile waits for it and then
        leads the next batch), without the bookkeeping of a batch of waiting callers."""
        state.flushing = True
        error: StepsourceError | None = None
        try:
            with anyio.CancelScope(shield=True):
                try:
                    [outcome] = await self._transaction([commit])
                except StepsourceError as exc:  # what a batch of one gives its caller
                    error = type(exc)(exc.reason, execution_id=commit.stream_id, hint=exc.hint)
        finally:
            state.flushing = False
            if state.pending:
                state.pending[0].wake.set()
        if error is not None:
            raise error
        if isinstance(outcome, VersionConflictError):
            raise outcome
        return outcome

    async def _append_joined(self, commit: Commit) -> int:
        """Write one commit in the transaction this task joined, alone: it commits with the
        step's own rows when the step's transaction does (a group of other tasks' commits
        must neither wait for it nor be rolled back with it)."""
        s = self.pool.schema

        async def body(conn: Conn) -> list[Outcome]:
            return await apply_commits(conn, s, [commit])

        [outcome] = await self.pool.transaction(body, "append events")
        if isinstance(outcome, VersionConflictError):
            raise outcome
        return outcome

    async def _flush(self, state: _LoopState) -> None:
        state.flushing = True
        batch: list[_Pending] = []
        try:
            with anyio.CancelScope(shield=True):
                if state.shared:  # let every task the last batch woke add its commit first
                    await anyio.lowlevel.checkpoint()
                batch, state.pending = state.pending, []
                state.shared = len(batch) > 1
                for pending in batch:
                    pending.taken = True
                await self._write_batch(batch)
        finally:
            state.flushing = False
            for pending in batch:
                pending.done = True
                pending.wake.set()
            if state.pending:
                state.pending[0].wake.set()

    async def _write_batch(self, batch: list[_Pending]) -> None:
        commits = [pending.commit for pending in batch]
        try:
            outcomes = await self._transaction(commits)
        except StepsourceError as exc:
            if len(commits) == 1 or not self._settle_alone(exc):
                self._fail_all(batch, exc)
                return
            # one commit's own fault (a value the server refuses, a writer that bypassed the
            # table lock) must not fail the others: settle each commit on its own
            for pending in batch:
                try:
                    pending.position = await self._alone(pending.commit)
                except StepsourceError as single:
                    pending.error = single
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, VersionConflictError):
                pending.error = outcome
            else:
                pending.position = outcome

    @staticmethod
    def _settle_alone(exc: StepsourceError) -> bool:
        unique = isinstance(exc.__cause__, psycopg.errors.UniqueViolation)
        return unique or isinstance(exc, UsageError)

    async def _alone(self, commit: Commit) -> int:
        """One commit in a transaction of its own; its position, or raise its error."""
        try:
            (outcome,) = await self._transaction([commit])
        except BackendUnavailableError as exc:
            if not isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise
            outcome = version_conflict(commit, await self.stream_version(commit.stream_id))
        if isinstance(outcome, VersionConflictError):
            raise outcome
        return outcome

    @staticmethod
    def _fail_all(batch: list[_Pending], exc: StepsourceError) -> None:
        for pending in batch:  # the whole transaction failed: each caller gets the cause
            pending.error = type(exc)(
                exc.reason, execution_id=pending.commit.stream_id, hint=exc.hint
            )

    async def _transaction(self, commits: list[Commit]) -> list[Outcome]:
        s = self.pool.schema

        async def body(conn: Conn) -> list[Outcome]:
            return await apply_commits(conn, s, commits)

        outcomes = await self.pool.statement(body, "append events")  # its own transaction
        self.transactions += 1
        return outcomes

    # -- reads ------------------------------------------------------------------------------
    async def _rows(self, sql: str, params: tuple[object, ...], what: str) -> list[RecordedEvent]:
        async def body(conn: Conn) -> list[RecordedEvent]:
            cursor = await conn.execute(sql, params)
            return list(map(RecordedEvent._make, await cursor.fetchall()))  # columns as fields

        return await self.pool.read(body, what)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        upto = _NO_LIMIT if to_version is None else min(to_version, _NO_LIMIT)
        start = max(from_version, 1)
        events = await self._rows(
            f"SELECT {_EVENT_COLUMNS} FROM {self.pool.schema}.events WHERE stream_id = %s "
            "AND version >= %s AND version <= %s ORDER BY version",
            (stream_id, min(start, _NO_LIMIT), upto),
            "read a stream",
        )
        # ORDER BY version over the UNIQUE (stream_id, version) index: strictly increasing,
        # so the versions run without a gap exactly when the first and last say so
        if events and (events[0].version != start or events[-1].version != start + len(events) - 1):
            raise CorruptLogError(
                f"the stream's versions from {start} have a gap in {self.pool.options.where()}",
                execution_id=stream_id,
                hint="The table was changed outside stepsource: restore it from a backup",
            )
        return events

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if limit <= 0:
            return []
        return await self._rows(
            f"SELECT {_EVENT_COLUMNS} FROM {self.pool.schema}.events WHERE position > %s "
            "ORDER BY position LIMIT %s",
            (max(min(after_position, _NO_LIMIT), -_NO_LIMIT), min(limit, _NO_LIMIT)),
            "read the log",
        )

    async def _one_int(self, sql: str, params: tuple[object, ...], what: str) -> int:
        async def body(conn: Conn) -> int:
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone()
            return 0 if row is None or row[0] is None else int(row[0])

        return await self.pool.read(body, what)

    async def stream_version(self, stream_id: str) -> int:
        return await self._one_int(
            f"SELECT MAX(version) FROM {self.pool.schema}.events WHERE stream_id = %s",
            (stream_id,),
            "read a stream's version",
        )

    async def max_position(self) -> int:
        return await self._one_int(
            f"SELECT MAX(position) FROM {self.pool.schema}.events", (), "read the last position"
        )
