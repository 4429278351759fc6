"""The one owner of a SQLite backend's file: its writer connection, its readers, its thread.

Every part of :class:`~stepsource.adapters.sqlite.SQLiteBackend` (log, queue, inbox,
key-value store, definitions and snapshots) reaches the file through one
:class:`SQLiteConnection`, as nats-py's ``JetStreamContext`` and ``KeyValue`` reach the server
through one ``Client``.

Writers use ``BEGIN IMMEDIATE`` (the write lock is taken up front, so two writers never
deadlock upgrading a read), waiting for a lock held elsewhere up to the busy timeout
(:func:`begin_immediate`); readers run beside them on their own
connections, which WAL allows. Writes run on the one long-lived writer thread
(:mod:`~stepsource.adapters.sqlite.writer`), reads on pooled worker threads, at most a few
at once per event loop. The exception is an append found the writer idle and the
write lock free (:meth:`SQLiteConnection.write_here`): it is written in the event loop's own
thread, which saves the two context switches of a hand-off, a third of a 1-row commit on a
loaded machine, and blocks the loop no longer than the commit itself (its fsync); the log
decides which appends (:mod:`~stepsource.adapters.sqlite.log`).

One object may be used from several event loops (its connections are guarded by thread
locks and its anyio primitives are kept per loop, :class:`LoopState`); processes share the
file through SQLite's own locking. Driver errors leave this module translated into the error
tree (:meth:`SQLiteConnection.translate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from stepsource.adapters.handoff import Waker, loop_waker
from stepsource.adapters.ports import Commit
from stepsource.adapters.sqlite.schema import SCHEMA, SCHEMA_NAMES
from stepsource.adapters.sqlite.writer import WriterThread
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
)

__all__ = ["BUSY", "Busy", "LoopState", "Pending", "SQLiteConnection"]

T = TypeVar("T")


class Busy(enum.Enum):
    """What :meth:`SQLiteConnection.write_here` returns when the write must go to the thread."""

    BUSY = "busy"


BUSY = Busy.BUSY

_READERS = 4
#: each connection's page cache, in KiB as SQLite takes it (negative); SQLite's default is
#: 2 MiB per connection, which stays resident in a long-lived worker once a burst touched it
_CACHE_KIB = -256


@dataclass(eq=False, slots=True)
class Pending:
    """One caller's commit waiting for (or written by) a group-commit leader."""

    commit: Commit
    wake: anyio.Event  # set once the batch holding it is written, or to make it lead one
    taken: bool = False
    done: bool = False
    position: int | None = None
    error: StepsourceError | None = None


@dataclass(slots=True)
class LoopState:
    """The anyio primitives of one connection owner in one event loop (they cannot cross
    loops), and the group commit's queue there (see :mod:`~stepsource.adapters.sqlite.log`)."""

    waker: Waker
    flushing: bool = False  # a batch of appends is being written
    shared: bool = False  # the last batch held several commits: callers run concurrently
    last_stream: str | None = None  # the stream of the last batch, if it held one commit
    unyielded: int = 0  # lone commits written in a row without letting other tasks run
    readers: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(_READERS))
    pending: list[Pending] = field(default_factory=list)


_LOOP_STATES: anyio.lowlevel.RunVar[weakref.WeakKeyDictionary[SQLiteConnection, LoopState]] = (
    anyio.lowlevel.RunVar("stepsource_sqlite_loop_states")
)


def begin_immediate(conn: sqlite3.Connection, wait_ms: int) -> None:
    """``BEGIN IMMEDIATE``, waiting up to ``wait_ms`` for a write lock held elsewhere.

    The writer connection has no busy handler (``busy_timeout = 0``), so that a lone commit
    in the event loop's thread can try the lock without waiting
    (:meth:`SQLiteConnection.write_here`) and without switching the timeout off and on around
    every commit; the writer thread waits here instead, sleeping in growing steps as
    SQLite's own handler does. Once the lock is held nothing else in a transaction waits.
    """
    deadline = 0.0
    delay = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or conn.in_transaction:
                raise
            now = time.monotonic()
            deadline = deadline or now + wait_ms / 1000
            if now >= deadline:
                raise
            time.sleep(min(delay, deadline - now))  # the writer thread's wait: the loop runs on
            delay = min(delay * 2, 0.05)


def transaction(
    conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T], wait_ms: int = 0
) -> T:
    """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction (waiting up to ``wait_ms`` for the
    write lock, :func:`begin_immediate`), rolled back if it raises."""
    begin_immediate(conn, wait_ms)
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


def is_busy(exc: sqlite3.Error) -> bool:
    """A lock held elsewhere: the connection itself is fine and is kept."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


class SQLiteConnection:
    """The file's writer connection (on its one writer thread), its pool of reader
    connections, and the per-event-loop state of the callers (see the module docstring).

    ``max_commit_bytes`` bounds what the parts write: a commit, an inbox item, an entry.
    """

    max_commit_bytes = 64 * 1024 * 1024

    def __init__(
        self, path: str, synchronous: Literal["full", "normal"], busy_timeout_ms: int
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._writer: sqlite3.Connection | None = None
        self._schema_ready = False  # the tables exist (checked or created by open())
        self._writer_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._generation = 0  # bumped by close: readers of an older generation are closed
        self._thread = WriterThread(f"stepsource-sqlite-writer {path}")
        weakref.finalize(self, self._thread.stop)
        #: how long the last transaction written in the event loop's thread held it
        #: (seconds, ``BEGIN`` to ``COMMIT``: its statements and the disk's flush)
        self.last_write_seconds = 0.0
        self._asyncio_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState]
        self._asyncio_states = weakref.WeakKeyDictionary()

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
                        hint="Put the file on a local disk; network file systems do not "
                        "support WAL",
                    )
                self._ensure_schema(conn)
                conn.execute("PRAGMA busy_timeout = 0")  # the writer waits in begin_immediate
            except sqlite3.OperationalError as exc:
                conn.close()
                if not is_busy(exc) or time.monotonic() >= deadline:
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
        if SCHEMA_NAMES - found:  # a new file, or one from before a table was added
            transaction(conn, lambda c: [c.execute(sql) for sql in SCHEMA])
        self._schema_ready = True

    def translate(self, exc: sqlite3.Error) -> StepsourceError:
        """The error of the tree that a driver error means for this file."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        if isinstance(exc, sqlite3.DatabaseError) and name.startswith(
            ("SQLITE_NOTADB", "SQLITE_CORRUPT")
        ):
            return CorruptLogError(
                f"the file {self.path} is not a SQLite database or is damaged ({exc})",
                hint="Restore it from a backup or point the URL at another file",
            )
        if is_busy(exc):
            return BackendUnavailableError(
                f"the SQLite file {self.path} stayed locked by another connection for more "
                f"than {self.busy_timeout_ms} ms ({exc})",
                hint="Raise busy_timeout (?busy_timeout=MS in the URL) or find the stuck writer",
            )
        if name.startswith("SQLITE_CANTOPEN") or "unable to open" in str(exc):
            return BackendUnavailableError(
                f"cannot open the SQLite file {self.path} ({exc})",
                hint="Check that its directory exists and that this process may write there",
            )
        return BackendUnavailableError(
            f"the SQLite file {self.path} failed ({exc})",
            hint="Check the disk (space, permissions) and that the file is a stepsource log",
        )

    def with_writer(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on the writer connection (opening it if needed), errors translated.
        On the writer thread only (:meth:`in_writer`)."""
        with self._writer_lock:
            try:
                if self._writer is None:
                    self._writer = self._connect_writer()
                return body(self._writer)
            except sqlite3.Error as exc:
                if self._writer is not None and (self._writer.in_transaction or not is_busy(exc)):
                    self._drop_writer()  # reconnect next time rather than reuse a broken handle
                raise self.translate(exc) from exc

    def write_here(self, body: Callable[[sqlite3.Connection], T]) -> T | Busy:
        """Run ``body`` in one transaction on the writer connection *in the calling thread*
        (the event loop's), or return :data:`BUSY` having done nothing.

        A write done here costs no thread hop: the hand-off to the writer thread and the
        wake-up back are two context switches, a third of a 1-row commit on a loaded 2-core
        machine. It is done only when it cannot stall the caller for long or pass anything:
        the writer thread is idle (no job queued or running), the connection is open and
        free, and the write lock is free *now* (``BEGIN IMMEDIATE`` with no busy wait;
        another process's transaction sends the write to the thread, which waits). How long
        the transaction held the thread is kept in :attr:`last_write_seconds`.
        """
        if not self._thread.idle or self._writer is None:
            return BUSY
        if not self._writer_lock.acquire(blocking=False):
            return BUSY
        try:
            conn = self._writer
            if conn is None or conn.in_transaction:
                return BUSY
            started = time.perf_counter()
            try:
                conn.execute("BEGIN IMMEDIATE")  # no busy handler: never waits here
            except sqlite3.OperationalError as exc:
                if is_busy(exc) and not conn.in_transaction:
                    return BUSY
                self._drop_writer()
                raise self.translate(exc) from exc
            except sqlite3.Error as exc:
                self._drop_writer()
                raise self.translate(exc) from exc
            try:
                result = body(conn)
                conn.execute("COMMIT")
                self.last_write_seconds = time.perf_counter() - started
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):  # none left if COMMIT failed
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    if conn.in_transaction or not is_busy(exc):
                        self._drop_writer()
                    raise self.translate(exc) from exc
                raise
            return result
        finally:
            self._writer_lock.release()

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
            raise self.translate(exc) from exc
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
    def loop_state(self) -> LoopState:
        """This object's state in the running event loop (made on first use there)."""
        try:  # asyncio (the common case) first: one C call, no library sniffing
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._run_var_state()
        state = self._asyncio_states.get(loop)
        if state is None:
            state = self._asyncio_states[loop] = LoopState(loop.call_soon_threadsafe)
        return state

    def _run_var_state(self) -> LoopState:
        states = _LOOP_STATES.get(None)
        if states is None:
            states = weakref.WeakKeyDictionary()
            _LOOP_STATES.set(states)
        state = states.get(self)
        if state is None:
            state = states[self] = LoopState(loop_waker())
        return state

    async def in_writer(
        self,
        body: Callable[[], T],
        state: LoopState | None = None,
        event: anyio.Event | None = None,
    ) -> T:
        """Run ``body`` on the writer thread (one at a time, in order). ``state`` is the
        caller's :meth:`loop_state` if it has it already; ``event`` (unset, set by nobody
        else) the one to wait on, if it has one (see :meth:`WriterThread.run`)."""
        waker = (self.loop_state() if state is None else state).waker
        return await self._thread.run(body, waker, event)

    async def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` on a reader connection, on a worker thread."""
        if not self._schema_ready:
            await self.open()  # checks (or creates) the tables on first use
        limiter = self.loop_state().readers
        return await anyio.to_thread.run_sync(self._with_reader, body, limiter=limiter)

    async def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one transaction of its own on the writer connection."""
        wait = self.busy_timeout_ms
        return await self.in_writer(
            lambda: self.with_writer(lambda conn: transaction(conn, body, wait))
        )

    async def open(self) -> None:
        await self.in_writer(lambda: self.with_writer(lambda conn: None))

    async def close(self) -> None:
        await self.in_writer(self._close_sync)  # after the writes handed over before it
        self._thread.stop()

    async def settings(self) -> dict[str, object]:
        """The writer connection's journal mode and synchronous level, and how long a write
        waits for a lock held elsewhere (:func:`begin_immediate`)."""

        names = ("journal_mode", "synchronous")
        found = await self.in_writer(
            lambda: self.with_writer(
                lambda conn: {n: conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names}
            )
        )
        return {**found, "busy_timeout": self.busy_timeout_ms}
