"""Read models: the executions index in a local SQLite database, following the log.

The index lives beside the log (``x.db.readmodels`` for ``sqlite:///x.db``; an in-memory
SQLite database for ``memory://``) and is derived data: it can always be dropped and rebuilt
from the log. A *tracking* row holds the log position the rows reflect. Each batch of events
is folded into the rows and the tracking position is advanced **in the same transaction**,
after checking that the position is still the one the batch was read after: a batch is
applied exactly once even when several processes (workers, a CLI) follow the same log into
the same file, and a process killed mid-batch leaves nothing of that batch behind.

The runner reads the log in global order (``Backend.read_all`` pages): first catch-up, then
live, woken by the engine's notifier or its poll interval (``ReadModels.run`` runs in the
Engine's task group while ``async with engine`` is active). Queries first catch the index up
to the log's current ``max_position``, so a caller reads its own writes.

If the index is ahead of the log, or its first event is not the log's first event, it
belongs to another log (the file was replaced): it is dropped and rebuilt.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import orjson

from stepsource.adapters.ports import Backend
from stepsource.aggregates import events as ev
from stepsource.engine import index_tally, rebuild_helpers
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
from stepsource.engine.faults import kill_point
from stepsource.engine.index_reading import IndexBatch, Page, read_page
from stepsource.engine.notify import Notifier
from stepsource.engine.readmodel_store import EXECUTIONS_TABLE, StoredExecutionsIndex
from stepsource.engine.rebuild_helpers import HelperFailed, HelperPool, HelperSpec
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.errors import BackendUnavailableError, StepsourceError, UsageError
from stepsource.projections.executions_index import (
    COLUMNS,
    INDEX_VERSION,
    STATUSES,
    IndexedExecution,
    IndexFilter,
    fold,
    from_row,
    to_row,
)
from stepsource.projections.summaries import (
    ExecutionSummary,
    Touched,
    Unreadable,
    summarize,
)

__all__ = [
    "SCHEMA_VERSION",
    "ExecutionsIndex",
    "ProgressCallback",
    "ReadModels",
    "RebuildReport",
]

_logger = logging.getLogger("stepsource.readmodels")

T = TypeVar("T")

#: bumped when the rows change shape: an index of another version is dropped and rebuilt
SCHEMA_VERSION = INDEX_VERSION
NAME = "executions"
#: the live runner catches up at most this often (seconds); a query never waits for it
RUNNER_MIN_INTERVAL = 0.1

#: ``progress(position, target)``: the log position folded so far and the one aimed at
ProgressCallback = Callable[[int, int], None]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tracking (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS executions (
        execution_id TEXT PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE,
        step_id TEXT NOT NULL,
        step_version TEXT NOT NULL,
        flow_id TEXT,
        parent_execution_id TEXT,
        correlation_id TEXT,
        priority INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
        attempt INTEGER NOT NULL,
        worker_id TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        updated_at INTEGER NOT NULL,
        completed_at INTEGER,
        last_error TEXT,
        version INTEGER NOT NULL,
        events INTEGER NOT NULL,
        key TEXT)""",
    "CREATE INDEX IF NOT EXISTS executions_by_status ON executions (status, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_step ON executions (step_id, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_flow ON executions (flow_id, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_created ON executions (created_at)",
    "CREATE INDEX IF NOT EXISTS executions_by_key ON executions (key, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_parent ON executions (parent_execution_id)",
    "CREATE INDEX IF NOT EXISTS executions_by_end ON executions (status, completed_at)",
)
_DROP = (
    "DROP TABLE IF EXISTS executions",
    "DROP TABLE IF EXISTS tracking",
    "DROP TABLE IF EXISTS meta",
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM executions"
_INSERT = (
    f"INSERT OR REPLACE INTO executions ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
# the executions a batch touches, as one JSON array parameter: one statement whatever their
# number (an IN list of N marks is a statement per N, and SQLite's statement cache keeps up to
# 128 of them per connection, several MB resident in a worker)
_SELECT_IDS = f"{_SELECT} WHERE execution_id IN (SELECT value FROM json_each(?))"


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What a rebuild did: events folded, executions indexed, position reached, seconds, and
    the helper processes that read the log beside it (0: it read the log itself)."""

    events: int
    executions: int
    position: int
    seconds: float
    helpers: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float(self.events)


class ExecutionsIndex:
    """The executions table and its tracking position in one SQLite database.

    Every method is synchronous and runs in a worker thread (``ReadModels`` calls them with
    ``anyio.to_thread``); one connection per object, guarded by a lock.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.redact_errors = False
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        #: the stream id of the log's first event, once checked against the index's record
        self.checked_origin = False

    def __repr__(self) -> str:
        return f"ExecutionsIndex({self.path or ':memory:'!r})"

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            if self.path is None:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(
                    self.path, timeout=30.0, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
                # derived data: a commit lost on power loss is lost with its tracking position
                # and simply folded again
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA cache_size = -256")  # KiB: a worker keeps it resident
            self._ensure_schema(conn)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None
        return conn

    def _unavailable(self, exc: sqlite3.Error) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the read-model database {self.path or ':memory:'} cannot be used: {exc}",
            hint="It is derived data: delete the file and it is rebuilt from the log "
            "(`stepsource projections rebuild`)",
        )

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            version = None
            if found:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                version = None if row is None else row[0]
            if version != str(SCHEMA_VERSION):
                for sql in _DROP:
                    conn.execute(sql)
            for sql in _SCHEMA:
                conn.execute(sql)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("INSERT OR IGNORE INTO tracking (name, position) VALUES (?, 0)", (NAME,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            try:
                return body(self._conn)
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from None

    def close(self) -> None:
        """Close the connection of a file index (an in-memory one lives as long as this)."""
        with self._lock:
            if self._conn is not None and self.path is not None:
                self._conn.close()
                self._conn = None
                self.checked_origin = False

    # -- tracking --------------------------------------------------------------------------
    def position(self) -> int:
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT position FROM tracking WHERE name = ?", (NAME,)).fetchone()
            return 0 if row is None else int(row[0])

        return self._run(query)

    def origin(self) -> str | None:
        """The stream id of the first event of the log this index was built from."""

        def query(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
            return None if row is None else str(row[0])

        return self._run(query)

    def reset(self) -> None:
        """Drop every row and start again from position 0 (one transaction)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM executions")
                conn.execute("DELETE FROM meta WHERE key = 'origin'")
                conn.execute("UPDATE tracking SET position = 0 WHERE name = ?", (NAME,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._run(body)
        self.checked_origin = False

    def apply(
        self,
        after: int,
        batch: Sequence[tuple[int, ev.ExecutionEvent | Touched | Unreadable]],
        origin: str | None,
    ) -> bool:
        """Fold a batch read after position ``after`` and advance the tracking position to
        its last event's, in one transaction; False (nothing written) if the index is no
        longer at ``after`` (another process applied it first)."""
        if not batch:
            return True
        last = batch[-1][0]
        ids = sorted({str(event.originator_id) for _, event in batch})

        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT position FROM tracking WHERE name = ?", (NAME,)
                ).fetchone()
                if row is None or int(row[0]) != after:
                    conn.execute("ROLLBACK")
                    return False
                current: dict[str, IndexedExecution] = {}
                for found in conn.execute(_SELECT_IDS, (orjson.dumps(ids).decode(),)):
                    item = from_row(found)
                    current[item.summary.execution_id] = item
                changed = fold(current, batch)
                conn.executemany(
                    _INSERT,
                    [
                        to_row(changed[eid], redact_errors=self.redact_errors)
                        for eid in sorted(changed)
                    ],
                )
                if after == 0 and origin is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('origin', ?)", (origin,)
                    )
                conn.execute("UPDATE tracking SET position = ? WHERE name = ?", (last, NAME))
                kill_point("readmodel-batch")  # tests: a SIGKILL here must leave nothing
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return True

        return self._run(body)

    # -- queries ---------------------------------------------------------------------------
    def query(
        self, where: IndexFilter, *, limit: int, offset: int, cursor: str | None
    ) -> list[ExecutionSummary] | None:
        """Matching rows, newest (latest scheduled in the log) first; None for an unknown
        cursor."""
        equals, at_least = where.equals(), where.at_least()
        params: list[Any] = [*equals.values(), *at_least.values()]
        conditions = [f"{column} = ?" for column in equals]
        conditions += [f"{column} >= ?" for column in at_least]

        def body(conn: sqlite3.Connection) -> list[ExecutionSummary] | None:
            clauses, values = list(conditions), list(params)
            if cursor is not None:
                row = conn.execute(
                    "SELECT position FROM executions WHERE execution_id = ?", (cursor,)
                ).fetchone()
                if row is None:
                    return None
                clauses.append("position < ?")
                values.append(int(row[0]))
            sql = _SELECT
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += " ORDER BY position DESC LIMIT ? OFFSET ?"
            values.extend((limit, offset))
            return [from_row(found).summary for found in conn.execute(sql, values)]

        return self._run(body)

    def replace(self, summary: ExecutionSummary) -> None:
        """Write one execution's row again (a released quarantine), keeping its position."""

        def body(conn: sqlite3.Connection) -> None:
            found = conn.execute(
                f"{_SELECT} WHERE execution_id = ?", (summary.execution_id,)
            ).fetchone()
            if found is not None:
                row = IndexedExecution(from_row(found).position, summary)
                conn.execute(_INSERT, to_row(row, redact_errors=self.redact_errors))

        self._run(body)

    def tally(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        by: str,
        bucket: tuple[int, int, int] | None = None,
    ) -> dict[Any, int]:
        """Rows per value (or bucket) of a column, counted by SQLite (``ReadModelStore.tally``)."""
        return self._run(lambda conn: index_tally.tally(conn, equals, at_least, by, bucket))

    def bounds(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
    ) -> tuple[Any, Any] | None:
        return self._run(lambda conn: index_tally.bounds(conn, equals, at_least, column))

    def count(self) -> int:
        return self._run(
            lambda conn: int(conn.execute("SELECT count(*) FROM executions").fetchone()[0])
        )

    def dump(self) -> list[tuple[Any, ...]]:
        """Every row in storage form, oldest first (tests compare indexes with it)."""
        return self._run(
            lambda conn: [tuple(r) for r in conn.execute(f"{_SELECT} ORDER BY position")]
        )


class ReadModels:
    """Keeps the executions index caught up with one engine's log."""

    def __init__(
        self,
        store: ExecutionStore,
        path: str | None,
        *,
        batch_size: int = 500,
        rebuild_batch_size: int = 5000,
        gc_threshold: int | None = WORKER_THRESHOLD,
        helpers: HelperSpec | None = None,
    ) -> None:
        self.store = store
        #: how a catch-up of a large backlog (a rebuild, the first catch-up of an index kept
        #: in memory) reads the log in helper processes (None: it reads it itself)
        self.helpers = helpers
        #: helper processes started so far (a rebuild reports how many it started)
        self.helpers_started = 0
        self._helping: anyio.Event | None = None  # set when the running one ends
        # PostgreSQL keeps the index in its own database; the others in a local SQLite one
        kept = store.backend.readmodel_store(EXECUTIONS_TABLE)
        self.index: ExecutionsIndex | StoredExecutionsIndex
        self.index = ExecutionsIndex(path) if kept is None else StoredExecutionsIndex(kept)
        # an encrypted log's index keeps error types, not their (user-data) messages
        self.index.redact_errors = store.codec.encrypted
        self.batch_size = batch_size
        self.rebuild_batch_size = rebuild_batch_size
        #: the collector's youngest threshold while a catch-up folds (see .collector): a page
        #: of records is thousands of short-lived tuples, and a client engine (no worker
        #: pool) would otherwise run the default collector through a rebuild
        self.gc_threshold = gc_threshold

    def __repr__(self) -> str:
        return f"ReadModels({self.index.path or ':memory:'!r})"

    @property
    def backend(self) -> Backend:
        return self.store.backend

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    async def position(self) -> int:
        return await self._call(self.index.position)

    async def _first_stream(self) -> str | None:
        first = await self.backend.read_all(0, 1)
        return first[0].stream_id if first else None

    async def _check_same_log(self) -> int:
        """Drop an index that belongs to another log (ahead of it, or another first event);
        return the log's end position."""
        log_end = await self.backend.max_position()  # the log first: its errors come first
        tracked = await self.position()
        if tracked > log_end:  # read the log's end again after ``tracked``: the log grows
            log_end = await self.backend.max_position()
        if tracked == 0:
            self.index.checked_origin = True
            return log_end
        stale = tracked > log_end
        if not stale and not self.index.checked_origin:
            stale = await self._call(self.index.origin) != await self._first_stream()
        if stale:
            _logger.warning(
                "%r was built from another log (tracked position %d, log end %d): rebuilding",
                self.index,
                tracked,
                log_end,
            )
            await self._call(self.index.reset)
        self.index.checked_origin = True
        return log_end

    async def catch_up(
        self,
        until: int | None = None,
        *,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Fold the log into the index up to position ``until`` (default: the log's end now);
        return the number of events this call folded."""
        with tuned_collector(self.gc_threshold):
            return await self._catch_up(until, batch_size, progress)

    async def _catch_up(
        self, until: int | None, batch_size: int | None, progress: ProgressCallback | None
    ) -> int:
        log_end = await self._check_same_log()
        target = log_end if until is None else until
        size = batch_size or self.batch_size
        codec = self.store.codec

        async def next_page(after: int) -> Page:
            return await read_page(self.backend, codec, after, size, target)

        folded = 0
        position = await self.position()
        if self._helpers_pay(target - position):  # a large backlog: a rebuild, a first start
            folded, position = await self._catch_up_in_helpers(target, progress)
        while position < target:
            done, finished = await self._fold(next_page, position, target, progress)
            folded += done
            if finished:
                break
            # the fold did not end (cancelled), or another process moved the index first:
            # go on from where it is now
            position = await self.position()
        return folded

    async def _fold(
        self,
        next_page: Callable[[int], Awaitable[Page]],
        position: int,
        target: int,
        progress: ProgressCallback | None,
    ) -> tuple[int, bool]:
        """Fold the pages ``next_page(after)`` gives, from ``position`` on, until ``target``
        or the log's end; return the events folded and whether it ended there (False: the
        fold was cancelled or another process moved the index, which is left as it is)."""
        folded = 0
        ahead = await next_page(position)
        while position < target and ahead.events:
            page = ahead
            applied: list[bool] = []
            origin = page.first if position == 0 else None

            async def apply(
                after: int = position,
                batch: IndexBatch = page.batch,
                first: str | None = origin,
                out: list[bool] = applied,
            ) -> None:
                out.append(await self._call(self.index.apply, after, batch, first))

            # the next page is read and decoded while this one is folded in a thread; an error
            # of either is raised as itself (a BackendUnavailableError the runner logs and
            # retries), not inside the task group's ExceptionGroup
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(apply)
                    if page.end < target:
                        ahead = await next_page(page.end)
            except ExceptionGroup as group:  # why: raised again as the one error inside it
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            if not applied:  # the fold did not end (cancelled): let a cancellation through
                await anyio.lowlevel.checkpoint()
                return folded, False
            if not applied[0]:  # another process moved the index first
                return folded, False
            folded += page.events  # a batch may fold a run of events as one
            position = page.end
            if progress is not None:
                progress(position, target)
        return folded, True

    async def rebuild(self, progress: ProgressCallback | None = None) -> RebuildReport:
        """Drop the index and fold the whole log again (the log as it is now)."""
        started = time.perf_counter()
        await self._call(self.index.reset)
        target = await self.backend.max_position()
        if progress is not None:
            progress(0, target)
        before = self.helpers_started
        events = await self.catch_up(target, batch_size=self.rebuild_batch_size, progress=progress)
        return RebuildReport(
            events=events,
            executions=await self._call(self.index.count),
            position=await self.position(),
            seconds=time.perf_counter() - started,
            helpers=self.helpers_started - before,
        )

    def _helpers_pay(self, backlog: int) -> bool:
        """Whether a catch-up of ``backlog`` positions is worth starting helper processes
        (only where positions count events: helpers are handed ranges of positions)."""
        spec = self.helpers
        return (
            spec is not None
            and spec.processes > 0
            and self.backend.dense_positions
            and backlog > 0
            and backlog >= rebuild_helpers.HELPERS_FROM
        )

    async def _catch_up_in_helpers(
        self, target: int, progress: ProgressCallback | None
    ) -> tuple[int, int]:
        """Fold the log up to ``target`` with pages read and checked by helper processes
        (:mod:`.rebuild_helpers`), one such catch-up at a time (another one waits for it, then
        folds what is left itself); return the events folded and the position reached. A
        helper that fails only ends this: the caller folds the rest itself."""
        while (helping := self._helping) is not None:
            await helping.wait()
        done = self._helping = anyio.Event()  # claimed before any await: one at a time
        started = 0
        try:
            position = await self.position()
            spec = self.helpers
            if spec is None or not self._helpers_pay(target - position):
                return 0, position
            pool = HelperPool(spec, self.store.codec, position, target, self.rebuild_batch_size)
            try:
                async with pool:
                    folded, _ = await self._fold(pool.next_page, position, target, progress)
            except HelperFailed as failed:
                _logger.warning("the catch-up goes on without helper processes: %s", failed)
                folded = pool.events_until(int(await self.position()))
            finally:
                started = pool.started
        finally:
            self.helpers_started += started
            self._helping = None
            done.set()
        return folded, int(await self.position())

    async def executions(
        self,
        *,
        status: str | None = None,
        step_id: str | None = None,
        flow_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        key: str | None = None,
    ) -> list[ExecutionSummary]:
        """Query the index after catching it up to the log's end (read-your-writes)."""
        _check_query(status, since, limit, offset)
        after = None if cursor is None else parse_execution_id(cursor)
        await self.catch_up()
        found = await anyio.to_thread.run_sync(
            lambda: self.index.query(
                IndexFilter(status, step_id, flow_id, key, since),
                limit=limit,
                offset=offset,
                cursor=after,
            )
        )
        if found is None:
            raise UsageError(
                f"cursor {cursor!r} is not an execution in the index",
                hint="Pass the execution_id of the last row of the previous page",
            )
        return found

    async def refresh(self, events: Sequence[ev.ExecutionEvent]) -> None:
        """Fold one execution's whole log into its row again (its events, decoded)."""
        summaries: dict[str, ExecutionSummary] = {}
        for event in events:
            summarize(summaries, event)
        for summary in summaries.values():
            await self._call(self.index.replace, summary)

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every row of the index (after catching up), oldest first."""
        await self.catch_up()
        return await self._call(self.index.dump)

    async def run(
        self,
        wake: Notifier,
        poll_interval: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the log: catch up, then fold new events as they come, until cancelled."""
        task_status.started()
        interval = max(poll_interval, RUNNER_MIN_INTERVAL)
        delay = interval
        while True:
            try:
                await self.catch_up()
                delay = interval
            except StepsourceError as error:  # the backend is away for now: try again later
                _logger.warning("the read-model runner could not catch up: %s", error)
                delay = min(delay * 2, 30.0)
            await wake.wait(delay)
            # a burst of changes is folded in one go: queries catch up by themselves anyway
            await anyio.sleep(RUNNER_MIN_INTERVAL / 2)

    async def aclose(self) -> None:
        await self._call(self.index.close)


def _check_query(status: str | None, since: datetime | None, limit: int, offset: int) -> None:
    if status is not None and status not in STATUSES:
        raise UsageError(
            f"unknown status {status!r}",
            hint=f"A status is one of: {', '.join(STATUSES)}",
        )
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise UsageError(
            f"since must be a timezone-aware datetime, not {since!r}",
            hint="For example datetime(2025, 1, 1, tzinfo=UTC)",
        )
    for name, value, low in (("limit", limit, 0), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an int >= {low}, not {value!r}")
