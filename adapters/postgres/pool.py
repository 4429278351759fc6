"""The one object every part of the PostgreSQL backend is composed around: its connections.

psycopg's async connections belong to the event loop that opened them, so the pool keeps
idle connections per running asyncio loop (a backend object may be used from several
threads, each with its own loop) and at most ``pool_size`` connections per loop. Every
statement runs through :meth:`Pool.transaction`, :meth:`Pool.statement` (one statement on
the autocommit connection: its own transaction, no BEGIN and COMMIT round trips; the appends
and the queue's calls) or :meth:`Pool.read`, which translate the driver's errors into
stepsource's at this boundary: the parts never see ``psycopg.*`` exceptions, and the engine
never does. A transaction or statement that loses a deadlock or a serialization race is run
again (it wrote nothing).

A call runs shielded from cancellation for up to a grace (:mod:`.statement_grace`), so a
cancellation (a worker shutting down, a step's timeout) lets the statement in flight end and
keeps its connection. A connection that leaves a block in any other state than idle (an
error, a cancellation in the middle of a statement once the grace is over) is closed rather
than reused; the server rolls back whatever it had open. psycopg runs on asyncio only: under
trio every call is a clear UsageError.

The first connection creates the schema, its tables and its append function if any is
missing (under an advisory lock, so two processes opening a new database do not race on
``CREATE``); a schema of an earlier layout migrates that way (:mod:`.schema`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus

from stepsource.adapters.postgres.options import PostgresOptions
from stepsource.adapters.postgres.schema import (
    LAYOUT_CHECK,
    SCHEMA_LOCK,
    TABLES,
    layout_check,
    statements,
)
from stepsource.adapters.postgres.statement_grace import StatementGrace
from stepsource.errors import BackendUnavailableError, StepsourceError, UsageError

_logger = logging.getLogger("stepsource.postgres")

__all__ = ["Conn", "Pool"]

T = TypeVar("T")


class Conn(psycopg.AsyncConnection[tuple[Any, ...]]):
    """A connection of the pool: psycopg's, keeping one cursor for the statements sent most
    (an append, the queue's calls: a few rows each) instead of making one per call; reads of
    many rows use a cursor of their own, so their rows are not kept after the call."""

    _kept: psycopg.AsyncCursor[tuple[Any, ...]] | None = None

    def kept_cursor(self) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        """The connection's own cursor; each ``execute`` replaces its previous result."""
        cursor = self._kept
        if cursor is None or cursor.closed:
            cursor = self._kept = self.cursor()
        return cursor


#: how often a transaction that lost a deadlock or serialization race is tried again
_RETRIES = 5
_TRANSIENT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_IDLE = TransactionStatus.IDLE

#: the transaction a task's backend calls join (a transactional step's, see
#: :meth:`Pool.joined_transaction`): the pool it belongs to and its connection
_JOINED: ContextVar[tuple[Pool, Conn] | None] = ContextVar("stepsource_pg_joined", default=None)


@dataclass(slots=True)
class _LoopConnections:
    """The idle connections of one event loop, the bound on how many it opens, and the
    calls in flight on it (shielded from cancellation for a grace)."""

    slots: asyncio.Semaphore
    grace: StatementGrace
    idle: list[Conn] = field(default_factory=list)


def _finish_all(conns: list[Conn]) -> None:
    """Close connections synchronously (libpq's PQfinish): usable from any thread or loop."""
    while conns:
        conn = conns.pop()  # held while closing: its __del__ must see it closed
        conn.pgconn.finish()


class Pool:
    """Connections to one PostgreSQL database, per event loop, with the schema in place."""

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self.schema = options.schema
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConnections]
        self._loops = weakref.WeakKeyDictionary()
        self._schema_ready = False
        self._durability_checked = False  # the server's fsync setting, read once

    def __repr__(self) -> str:
        return f"Pool({self.options.where()})"

    # -- errors -----------------------------------------------------------------------------
    def running_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError(
                "the PostgreSQL backend runs on asyncio only: its driver's async connections "
                "(psycopg) have no support for trio or other event loops",
                hint="Run stepsource under asyncio (anyio.run(..., backend='asyncio')), or "
                "use a sqlite:// or memory:// URL",
            ) from None

    def _scrub(self, text: str) -> str:
        password = self.options.password
        return text.replace(password, "***") if password else text

    def translate(self, exc: BaseException, what: str) -> StepsourceError:
        """The stepsource error a driver error becomes (never carrying the password)."""
        detail = self._scrub(str(exc).strip().replace("\n", " "))
        if isinstance(exc, psycopg.DataError | UnicodeEncodeError):
            return UsageError(
                f"PostgreSQL cannot store a value given to {what} ({detail})",
                hint="Text values may not contain NUL characters or lone surrogates",
            )
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            hint = f"Grant the user CREATE and USAGE on schema {self.schema} (or create it)"
        elif isinstance(exc, psycopg.OperationalError):
            hint = "Check that the server runs there, accepts this user and is reachable"
        else:
            hint = f"Check the server's log; the schema {self.schema} may have been changed"
        return BackendUnavailableError(
            f"PostgreSQL at {self.options.where()} failed to {what} ({detail})", hint=hint
        )

    # -- connections ------------------------------------------------------------------------
    def _loop_connections(self) -> _LoopConnections:
        loop = self.running_loop()
        found = self._loops.get(loop)
        if found is None:
            found = self._loops[loop] = _LoopConnections(
                asyncio.Semaphore(self.options.pool_size), StatementGrace()
            )
            # a loop that ends without aclose() leaves no open connection behind
            weakref.finalize(loop, _finish_all, found.idle)
        return found

    async def connect(self) -> Conn:
        """A new connection of its own (not pooled; the caller closes it)."""
        return await self._connect()

    async def _connect(self) -> Conn:
        conninfo = make_conninfo("", **self.options.connect_kwargs())
        conn = await Conn.connect(conninfo, autocommit=True)
        try:
            if not self._durability_checked:
                await self._check_durability(conn)
            if not self._schema_ready:
                await self._ensure_schema(conn)
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _check_durability(self, conn: Conn) -> None:
        """Warn (or refuse, ``durability=strict``) once if the server does not flush its
        writes to disk: then no commit is durable, ``synchronous_commit`` or not."""
        if self.options.durability != "off":
            cursor = await conn.execute("SELECT current_setting('fsync')")
            row = await cursor.fetchone()
            if row is not None and str(row[0]).lower() == "off":
                why = (
                    f"PostgreSQL at {self.options.where()} runs with fsync=off: a server crash "
                    "or power loss may lose acknowledged steps"
                )
                fix = (
                    "Run the server with fsync=on (its default), or accept the risk with "
                    "?durability=warn (the default) or ?durability=off in the URL"
                )
                if self.options.durability == "strict":
                    raise BackendUnavailableError(why, hint=fix)
                _logger.warning("%s. To fix: %s", why, fix)
        self._durability_checked = True

    async def _ensure_schema(self, conn: Conn) -> None:
        """Create what is missing (or migrate a schema of an earlier layout); a read checks
        first, so an up-to-date schema takes no lock."""
        cursor = await conn.execute(LAYOUT_CHECK, layout_check(self.schema))
        row = await cursor.fetchone()
        if row is None or row[0] != len(TABLES) or not row[1]:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for sql in statements(self.schema):
                    await conn.execute(sql)
        self._schema_ready = True

    def joined(self) -> Conn | None:
        """The connection of the transaction this task's calls join, if any."""
        found = _JOINED.get()
        return found[1] if found is not None and found[0] is self else None

    @contextlib.asynccontextmanager
    async def joined_transaction(self, what: str) -> AsyncIterator[Conn]:
        """A transaction that every call of this pool made by this task joins until the block
        ends (appends included: they skip the group commit); committed at the end of the
        block, rolled back if it raises."""
        if _JOINED.get() is not None:
            raise UsageError(
                f"cannot {what} inside another transaction of the backend",
                hint="Run one transactional step at a time (they do not nest)",
            )
        async with self.connection(what) as conn, conn.transaction():
            token = _JOINED.set((self, conn))
            try:
                yield conn
            finally:
                _JOINED.reset(token)

    @contextlib.asynccontextmanager
    async def connection(self, what: str) -> AsyncIterator[Conn]:
        """A connection of this loop for one job; driver errors leave as stepsource errors.
        Inside :meth:`joined_transaction`, the transaction's connection."""
        joined = self.joined()
        if joined is not None:
            try:
                yield joined
            except psycopg.Error as exc:
                raise self.translate(exc, what) from exc
            return
        pool = self._loop_connections()
        async with pool.slots:
            conn = pool.idle.pop() if pool.idle else None
            try:
                if conn is None:
                    conn = await self._connect()
                yield conn
            except psycopg.Error as exc:
                raise self.translate(exc, what) from exc
            except UnicodeEncodeError as exc:
                raise self.translate(exc, what) from exc
            finally:
                if conn is not None:
                    self._put_back(pool, conn)

    def _put_back(self, pool: _LoopConnections, conn: Conn) -> None:
        """Keep an idle connection for the next job of its loop; close any other (a closed
        connection's status is UNKNOWN, one left in the middle of a statement ACTIVE)."""
        idle = conn.pgconn.transaction_status == _IDLE
        if idle and self._loops.get(asyncio.get_running_loop()) is pool:
            pool.idle.append(conn)
        else:
            conn.pgconn.finish()

    async def _run(self, body: Callable[[Conn], Awaitable[T]], what: str) -> T:
        """``body`` on a connection of this loop outside a transaction block (or in the
        joined transaction), shielded for the grace: :meth:`connection` without a context
        manager's cost, for the statements sent most."""
        pool = self._loop_connections()
        grace = pool.grace
        scope = grace.scope()
        try:
            with scope:
                return await self._run_here(pool, body, what)
        finally:
            grace.closed(scope)
        raise AssertionError("unreachable: the scope is never cancelled, only unshielded")

    async def _run_here(
        self, pool: _LoopConnections, body: Callable[[Conn], Awaitable[T]], what: str
    ) -> T:
        joined = self.joined()
        if joined is not None:
            try:
                return await body(joined)
            except psycopg.Error as exc:
                raise self.translate(exc, what) from exc
        async with pool.slots:
            conn = pool.idle.pop() if pool.idle else None
            try:
                if conn is None:
                    conn = await self._connect()
                return await body(conn)
            except (psycopg.Error, UnicodeEncodeError) as exc:
                raise self.translate(exc, what) from exc
            finally:
                if conn is not None:
                    self._put_back(pool, conn)

    async def transaction(self, body: Callable[[Conn], Awaitable[T]], what: str) -> T:
        """Run ``body`` in one transaction (READ COMMITTED), again if it lost a deadlock;
        each try shielded for the grace, its commit included."""
        grace = self._loop_connections().grace
        for attempt in range(_RETRIES + 1):
            scope = grace.scope()
            try:
                with scope:
                    async with self.connection(what) as conn, conn.transaction():
                        return await body(conn)
            except BackendUnavailableError as exc:
                if attempt == _RETRIES or not isinstance(exc.__cause__, _TRANSIENT):
                    raise
            finally:
                grace.closed(scope)
            await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def statement(self, body: Callable[[Conn], Awaitable[T]], what: str) -> T:
        """Run ``body``, one statement, outside a transaction block: on the pool's autocommit
        connections the statement is its own transaction (no BEGIN and COMMIT round trips),
        run again if it lost a deadlock (it wrote nothing)."""
        for attempt in range(_RETRIES + 1):
            try:
                return await self._run(body, what)
            except BackendUnavailableError as exc:
                if attempt == _RETRIES or not isinstance(exc.__cause__, _TRANSIENT):
                    raise
                await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def read(self, body: Callable[[Conn], Awaitable[T]], what: str) -> T:
        """Run ``body`` outside a transaction block (each statement its own snapshot)."""
        return await self._run(body, what)

    async def open(self) -> None:
        """Connect once (creating the schema if needed) and keep the connection idle."""
        async with self.connection("connect"):
            pass

    async def aclose(self) -> None:
        """Close every idle connection (of every loop); the pool reconnects when used again."""
        loops, self._loops = self._loops, weakref.WeakKeyDictionary()
        for pool in loops.values():
            _finish_all(pool.idle)  # synchronous: a finished loop's connections close too
        self._schema_ready = False
