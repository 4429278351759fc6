"""The embedded backend: one SQLite file in WAL mode, shareable by processes on one machine.

Writers use ``BEGIN IMMEDIATE`` (the write lock is taken up front, so two writers never
deadlock upgrading a read) with a busy timeout; readers run beside them on their own
connections, which WAL allows. Every call to the driver runs off the event loop: writes on
the backend's one long-lived writer thread (:mod:`~stepsource.adapters.sqlite_writer`),
reads on pooled worker threads.

**Group commit.** Concurrent :meth:`SQLiteBackend.append` calls of one event loop share one
transaction, with no background task: each caller puts its commit in a pending list and
takes the loop's write lock; whoever holds the lock takes *all* pending commits and writes
them in one hand-off to the writer thread and one COMMIT; a caller whose commit another
leader already wrote just returns its outcome. Inside the batch each commit is pre-checked
(version, lease) and applied under its own SAVEPOINT, so one caller's conflict never fails
the others'.
Sequential awaited appends cost one commit each.

A commit deletes the inbox items it consumed and applies its queue update under the same
savepoint; :meth:`SQLiteBackend.post` inserts an item and wakes the stream's queue row in
one transaction of its own.

**The global key-value store** is the ``kv`` table; revisions come from the one-row
``kv_sequence`` counter, so a key deleted (or expired and purged) and written again never gets
back an old revision. Its writes take the same path as every other non-append write: the
loop's write lock, the one writer connection, one short ``BEGIN IMMEDIATE`` transaction each
(so a compare-and-set is atomic across processes); each write also purges a few rows that
expired by its ``now_ms``. Reads run on reader connections and skip expired rows.

One backend object may be used from several event loops (its connections are guarded by
thread locks and its anyio primitives are kept per loop); processes share the file through
SQLite's own locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from stepsource.adapters._rules import (
    check_commit,
    check_post,
)
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    Lease,
    RecordedEvent,
    Snapshot,
)
from stepsource.adapters.sqlite_commits import Refused, apply_commits, post_in, stream_version
from stepsource.adapters.sqlite_kv import SQLiteKVStore
from stepsource.adapters.sqlite_writer import Waker, WriterThread, loop_waker
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
    UsageError,
    VersionConflictError,
)

__all__ = ["SQLiteBackend"]

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        topic TEXT NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (stream_id, version))""",
    """CREATE TABLE IF NOT EXISTS queue (
        stream_id TEXT PRIMARY KEY,
        step_id TEXT NOT NULL,
        priority INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        lease_owner TEXT,
        lease_expires_ms INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS queue_by_step ON queue (step_id, due_ms)",
    """CREATE TABLE IF NOT EXISTS snapshots (
        stream_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        topic TEXT NOT NULL,
        data BLOB NOT NULL)""",
    # added after the first release: IF NOT EXISTS upgrades older files in place
    """CREATE TABLE IF NOT EXISTS inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        data BLOB NOT NULL,
        posted_ms INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS inbox_by_stream ON inbox (stream_id)",
    """CREATE TABLE IF NOT EXISTS definitions (
        step_id TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        data BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        revision INTEGER NOT NULL,
        expires_ms INTEGER)""",
    "CREATE INDEX IF NOT EXISTS kv_by_expiry ON kv (expires_ms) WHERE expires_ms IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS kv_sequence (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        revision INTEGER NOT NULL)""",
)
_SCHEMA_NAMES = frozenset(re.findall(r"IF NOT EXISTS (\w+)", "\n".join(_SCHEMA)))
_EVENT_COLUMNS = "stream_id, version, topic, data, position"
_NO_LIMIT = 2**63 - 1
_READERS = 4
#: each connection's page cache, in KiB as SQLite takes it (negative); SQLite's default is
#: 2 MiB per connection, which stays resident in a long-lived worker once a burst touched it
_CACHE_KIB = -256


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
    """The anyio primitives of one backend in one event loop (they cannot cross loops)."""

    waker: Waker
    flushing: bool = False  # a batch of appends is being written
    shared: bool = False  # the last batch held several commits: callers run concurrently
    readers: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(_READERS))
    pending: list[_Pending] = field(default_factory=list)


_LOOP_STATES: anyio.lowlevel.RunVar[weakref.WeakKeyDictionary[SQLiteBackend, _LoopState]] = (
    anyio.lowlevel.RunVar("stepsource_sqlite_loop_states")
)


class SQLiteBackend(SQLiteKVStore, Backend):
    """Event streams, inboxes, work queue, definitions and snapshots in one SQLite file (WAL).

    ``synchronous`` is ``"full"`` (an acknowledged commit survives power loss) or
    ``"normal"`` (faster; the last commits may be lost on power loss, never corrupted).
    ``busy_timeout_ms`` bounds how long a writer waits for another process's write lock.
    ``commits_written`` counts the append transactions this object committed.
    """

    max_commit_bytes = 64 * 1024 * 1024
    leases_in_commit = True

    def __init__(
        self, path: str, *, synchronous: str = "full", busy_timeout_ms: int = 30000
    ) -> None:
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise UsageError(
                f"SQLiteBackend needs a file path, not {path!r}",
                hint="use MemoryBackend (memory://) for a log that lives in this process",
            )
        mode = synchronous.lower()
        if mode not in ("full", "normal"):
            raise UsageError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int):
            raise UsageError(f"busy_timeout_ms must be an int, not {busy_timeout_ms!r}")
        if not 0 <= busy_timeout_ms <= 2**31 - 1:
            raise UsageError(f"busy_timeout_ms must be 0 to 2**31 - 1, not {busy_timeout_ms}")
        self.path = path
        self.synchronous: Literal["full", "normal"] = "full" if mode == "full" else "normal"
        self.busy_timeout_ms = busy_timeout_ms
        self.commits_written = 0
        self._writer: sqlite3.Connection | None = None
        self._schema_ready = False  # the tables exist (checked or created by open())
        self._writer_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._generation = 0  # bumped by aclose: readers of an older generation are closed
        self._thread = WriterThread(f"stepsource-sqlite-writer {path}")
        weakref.finalize(self, self._thread.stop)
        self._asyncio_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]
        self._asyncio_states = weakref.WeakKeyDictionary()

    def readmodel_path(self) -> str | None:
        """The read models live beside the log, in ``<path>.readmodels``."""
        return self.path + ".readmodels"

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r}, synchronous={self.synchronous!r})"

    # -- connections (worker threads only) --------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        """The writer connection, in WAL mode, with the tables in place.

        Two processes opening a new file at once can get SQLITE_BUSY at once, without the
        busy handler (SQLite refuses a lock upgrade that could deadlock, as when both switch
        the journal mode): that is retried until the busy timeout, like any other wait.
        """
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            conn = self._connect()
            try:
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if str(mode).lower() != "wal":
                    raise BackendUnavailableError(
                        f"the SQLite file {self.path} cannot use WAL mode (it stays in {mode!r})",
                        hint="put the file on a local disk; network file systems do not "
                        "support WAL",
                    )
                self._ensure_schema(conn)
            except sqlite3.OperationalError as exc:
                conn.close()
                if not self._is_busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)  # the writer thread's own wait: the event loop runs on
                continue
            except BaseException:
                conn.close()
                raise
            return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables, unless they all exist: a plain read checks first, so opening a
        file that has them never waits for another process's write lock."""
        found = {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')"
            )
        }
        if _SCHEMA_NAMES - found:  # a new file, or one from before a table was added
            self._transaction(conn, lambda c: [c.execute(sql) for sql in _SCHEMA])
        self._schema_ready = True

    def _translate(self, exc: sqlite3.Error) -> StepsourceError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        if isinstance(exc, sqlite3.DatabaseError) and name.startswith(
            ("SQLITE_NOTADB", "SQLITE_CORRUPT")
        ):
            return CorruptLogError(
                f"the file {self.path} is not a SQLite database or is damaged ({exc})",
                hint="restore it from a backup or point the URL at another file",
            )
        if self._is_busy(exc):
            return BackendUnavailableError(
                f"the SQLite file {self.path} stayed locked by another connection for more "
                f"than {self.busy_timeout_ms} ms ({exc})",
                hint="raise busy_timeout (?busy_timeout=MS in the URL) or find the stuck writer",
            )
        if name.startswith("SQLITE_CANTOPEN") or "unable to open" in str(exc):
            return BackendUnavailableError(
                f"cannot open the SQLite file {self.path} ({exc})",
                hint="check that its directory exists and that this process may write there",
            )
        return BackendUnavailableError(
            f"the SQLite file {self.path} failed ({exc})",
            hint="check the disk (space, permissions) and that the file is a stepsource log",
        )

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return result

    def _with_writer(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on the writer connection (opening it if needed), errors translated."""
        with self._writer_lock:
            try:
                if self._writer is None:
                    self._writer = self._connect_writer()
                return body(self._writer)
            except sqlite3.Error as exc:
                if self._writer is not None and (
                    self._writer.in_transaction or not self._is_busy(exc)
                ):
                    self._drop_writer()  # reconnect next time rather than reuse a broken handle
                raise self._translate(exc) from exc

    @staticmethod
    def _is_busy(exc: sqlite3.Error) -> bool:
        """A lock held elsewhere: the connection itself is fine and is kept."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))

    def _drop_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()
            self._writer = None

    def _with_reader(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on an idle reader connection, used by one thread at a time."""
        with self._readers_lock:
            conn = self._idle_readers.pop() if self._idle_readers else None
            generation = self._generation
        healthy = False
        try:
            if conn is None:
                conn = self._connect()
                conn.execute("PRAGMA query_only = ON")
            result = body(conn)
            healthy = True
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        finally:
            if conn is not None:
                with self._readers_lock:
                    keep = healthy and generation == self._generation
                    if keep:
                        self._idle_readers.append(conn)
                if not keep:
                    conn.close()
        return result

    def _close_sync(self) -> None:
        with self._writer_lock:
            self._drop_writer()
            self._schema_ready = False  # checked again on reopen: the file may have changed
        with self._readers_lock:
            self._generation += 1
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()

    # -- async plumbing ---------------------------------------------------------------------
    def _loop_state(self) -> _LoopState:
        try:  # asyncio (the common case) first: one C call, no library sniffing
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._run_var_state()
        state = self._asyncio_states.get(loop)
        if state is None:
            state = self._asyncio_states[loop] = _LoopState(loop.call_soon_threadsafe)
        return state

    def _run_var_state(self) -> _LoopState:
        states = _LOOP_STATES.get(None)
        if states is None:
            states = weakref.WeakKeyDictionary()
            _LOOP_STATES.set(states)
        state = states.get(self)
        if state is None:
            state = states[self] = _LoopState(loop_waker())
        return state

    async def _in_writer(self, body: Callable[[], T]) -> T:
        """Run ``body`` on the backend's writer thread (one at a time, in order)."""
        return await self._thread.run(body, self._loop_state().waker)

    async def _read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        if not self._schema_ready:
            await self.open()  # checks (or creates) the tables on first use
        limiter = self._loop_state().readers
        return await anyio.to_thread.run_sync(self._with_reader, body, limiter=limiter)

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        return await self._in_writer(
            lambda: self._with_writer(lambda conn: self._transaction(conn, body))
        )

    async def open(self) -> None:
        await self._in_writer(lambda: self._with_writer(lambda conn: None))

    async def aclose(self) -> None:
        await self._in_writer(self._close_sync)  # after the writes handed over before it
        self._thread.stop()

    async def connection_settings(self) -> dict[str, object]:
        """The writer connection's journal mode, synchronous level and busy timeout."""

        names = ("journal_mode", "synchronous", "busy_timeout")
        return await self._in_writer(
            lambda: self._with_writer(
                lambda conn: {n: conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names}
            )
        )

    # -- the log ----------------------------------------------------------------------------
    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.max_commit_bytes, leases=True)
        state = self._loop_state()
        item = _Pending(commit, anyio.Event())
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
                hint="retry the append",
            )
        return item.position

    async def _flush(self, state: _LoopState, wake: anyio.Event) -> None:
        """Write every pending commit of this loop in one transaction; then wake their
        callers, and the first commit that arrived meanwhile to lead the next batch.
        ``wake`` is the leader's own event: the writer thread sets it when done."""
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
                await self._thread.run(lambda: self._write_batch(batch), state.waker, wake)
        finally:
            state.flushing = False
            for pending in batch:
                pending.done = True
                pending.wake.set()
            if state.pending:
                state.pending[0].wake.set()

    def _write_batch(self, batch: list[_Pending]) -> None:
        outcomes: list[int | VersionConflictError] = []

        def body(conn: sqlite3.Connection) -> None:
            outcomes.extend(apply_commits(conn, [pending.commit for pending in batch]))

        def commit_all(conn: sqlite3.Connection) -> None:
            self._transaction(conn, body)
            self.commits_written += 1  # under the writer lock: safe across loops

        try:
            self._with_writer(commit_all)
        except Refused as refused:  # the batch's only commit: rolled back whole
            batch[0].error = refused.conflict
            return
        except StepsourceError as exc:
            for pending in batch:  # the whole transaction failed: each caller gets the cause
                pending.error = type(exc)(
                    exc.reason, execution_id=pending.commit.stream_id, hint=exc.hint
                )
            return
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, VersionConflictError):
                pending.error = outcome
            else:
                pending.position = outcome

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        upto = _NO_LIMIT if to_version is None else to_version
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = ? "
                "AND version >= ? AND version <= ? ORDER BY version",
                (stream_id, from_version, upto),
            ).fetchall()
        )
        events = [RecordedEvent(*row) for row in rows]
        start = max(from_version, 1)
        if any(event.version != start + n for n, event in enumerate(events)):
            raise CorruptLogError(
                f"the stream's versions from {start} have a gap in {self.path}",
                execution_id=stream_id,
                hint="the file was changed outside stepsource: restore it from a backup",
            )
        return events

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if limit <= 0:
            return []
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                (after_position, limit),
            ).fetchall()
        )
        return [RecordedEvent(*row) for row in rows]

    async def stream_version(self, stream_id: str) -> int:
        return await self._read(lambda conn: stream_version(conn, stream_id))

    async def max_position(self) -> int:
        def query(conn: sqlite3.Connection) -> int:
            (position,) = conn.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()
            return int(position)

        return await self._read(query)

    # -- the work queue ---------------------------------------------------------------------
    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        steps = list(dict.fromkeys(step_ids))
        if not steps or limit <= 0:
            return []
        expires = now_ms + lease_ms

        def body(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                "SELECT stream_id, step_id, priority FROM queue "
                f"WHERE step_id IN ({', '.join('?' * len(steps))}) AND due_ms <= ? "
                "AND (lease_owner IS NULL OR lease_expires_ms < ?) "
                "ORDER BY priority DESC, due_ms ASC, stream_id ASC LIMIT ?",
                (*steps, now_ms, now_ms, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE queue SET lease_owner = ?, lease_expires_ms = ? WHERE stream_id = ?",
                [(worker_id, expires, stream_id) for stream_id, _, _ in rows],
            )
            return [Lease(stream_id, step, priority, expires) for stream_id, step, priority in rows]

        return await self._write(body)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        wanted = list(dict.fromkeys(stream_ids))
        if not wanted:
            return []

        def body(conn: sqlite3.Connection) -> list[str]:
            return [
                stream_id
                for stream_id in wanted
                if conn.execute(
                    "UPDATE queue SET lease_expires_ms = ? WHERE stream_id = ? AND lease_owner = ?",
                    (now_ms + lease_ms, stream_id, worker_id),
                ).rowcount
            ]

        return await self._write(body)

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE queue SET lease_owner = NULL, lease_expires_ms = 0, "
                "due_ms = COALESCE(?, due_ms) WHERE stream_id = ? AND lease_owner = ?",
                (due_ms, stream_id, worker_id),
            )
        )

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return None

        def query(conn: sqlite3.Connection) -> int | None:
            (due,) = conn.execute(  # the rule of _rules.wake_ms, row by row
                "SELECT MIN(CASE WHEN lease_owner IS NULL THEN due_ms "
                "ELSE MAX(due_ms, lease_expires_ms + 1) END) FROM queue "
                f"WHERE step_id IN ({', '.join('?' * len(steps))})",
                steps,
            ).fetchone()
            return None if due is None else int(due)

        return await self._read(query)

    # -- the inbox --------------------------------------------------------------------------
    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        return await self._write(lambda conn: post_in(conn, stream_id, kind, name, data, now_ms))

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT id, stream_id, kind, name, data, posted_ms FROM inbox "
                "WHERE stream_id = ? AND id > ? ORDER BY id LIMIT ?",
                (stream_id, after_id, min(limit, _NO_LIMIT)),
            ).fetchall()
        )
        return [InboxItem(*row) for row in rows]

    # -- published step definitions ---------------------------------------------------------
    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO definitions (step_id, version, data) VALUES (?, ?, ?)",
                (step_id, version, bytes(data)),
            )
        )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT version, data FROM definitions WHERE step_id = ?", (step_id,)
            ).fetchone()
        )
        return None if row is None else (str(row[0]), bytes(row[1]))

    # -- snapshots --------------------------------------------------------------------------
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO snapshots (stream_id, version, topic, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
                "topic = excluded.topic, data = excluded.data "
                "WHERE excluded.version >= snapshots.version",
                (snapshot.stream_id, snapshot.version, snapshot.topic, snapshot.data),
            )
        )

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        upto = _NO_LIMIT if max_version is None else max_version
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT stream_id, version, topic, data FROM snapshots "
                "WHERE stream_id = ? AND version <= ?",
                (stream_id, upto),
            ).fetchone()
        )
        return None if row is None else Snapshot(*row)
