"""Cancelling a call of the PostgreSQL backend while its statement is in flight (a worker
shutting down) leaves nothing behind that another worker has to wait for.

psycopg answers a cancelled call by asking the server to cancel the statement; under anyio
(which cancels again while psycopg waits for that request) it gives up and closes the
connection instead. Either way the server may still run the statement to the end: it had
already received it, and an autocommit statement commits on its own. A lease statement run
that way would lease executions to a worker that is gone (until the lease lapses), and it
can run after the same worker gave its other leases back. These tests hold a lease
statement on the server (behind a table lock), cancel its caller, then let it run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import psycopg
import pytest

from stepsource.adapters.contract import enqueue, make_commit
from stepsource.adapters.postgres import statement_grace
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.testing.postgres_server import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LEASE_MS = 60_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only


@pytest.fixture
async def backend(postgres_server: PostgresServer) -> AsyncIterator[PostgresBackend]:
    store = PostgresBackend.from_url(postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}"))
    await store.open()
    yield store
    await store.aclose()


async def _lease_statements(server: PostgresServer, schema: str) -> list[str]:
    """The lease statements on this schema the server is running or waiting to run."""
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT coalesce(wait_event_type, '') FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND state = 'active' AND query LIKE %s",
            (f"UPDATE {schema}.queue AS q SET lease_owner%",),
        )
        return [row[0] for row in await cursor.fetchall()]


async def _cancel_a_held_lease(
    server: PostgresServer, backend: PostgresBackend, worker_id: str, before_it_runs: bool
) -> list[object]:
    """Call ``lease`` while a table lock holds its statement on the server, cancel the call,
    then let the statement run; wait until the server has finished it. Returns what the
    call returned (nothing if it was cancelled, as it should be)."""
    schema = backend.options.schema
    returned: list[object] = []
    async with await psycopg.AsyncConnection.connect(server.url()) as locker:
        await locker.execute(f"LOCK TABLE {schema}.queue IN ACCESS EXCLUSIVE MODE")
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def leasing() -> None:
                with scope:
                    returned.append(await backend.lease(worker_id, ["job"], 10, LEASE_MS, 10))

            tg.start_soon(leasing)
            with anyio.fail_after(10):
                while await _lease_statements(server, schema) != ["Lock"]:
                    await anyio.sleep(0.01)
            scope.cancel()  # the worker shuts down while its lease statement waits
            if before_it_runs:
                await anyio.sleep(0.2)  # the call has given up by now, if it gives up
            await locker.commit()  # the statement runs
    with anyio.fail_after(10):
        while await _lease_statements(server, schema):
            await anyio.sleep(0.01)
    return returned


@pytest.mark.parametrize("before_it_runs", [True, False], ids=["held", "running"])
async def test_a_cancelled_lease_call_leaves_no_execution_leased(
    postgres_server: PostgresServer, backend: PostgresBackend, before_it_runs: bool
) -> None:
    await backend.append(make_commit("s1", 0, queue=enqueue("job")))
    returned = await _cancel_a_held_lease(postgres_server, backend, "gone", before_it_runs)
    assert returned == []  # the caller was cancelled: it got no lease to run or give back
    # so no lease may be left: another worker takes the execution at once, not in 60 s
    leases = await backend.lease("next", ["job"], 20, LEASE_MS, 10)
    assert [lease.stream_id for lease in leases] == ["s1"]


async def test_a_statement_after_a_cancelled_one_is_not_cancelled_in_its_place(
    backend: PostgresBackend,
) -> None:
    """When psycopg's cancel request completes (an asyncio cancellation, which it is not
    interrupted in), the connection goes back to the pool; the request must never land on
    the next statement on that connection (a worker's release of its lease after its handler
    was cancelled): the driver waits until the server has handled the request, and the
    server ignores one that finds the connection idle. Cancelled at every moment of a short
    statement's round trip, in turn."""
    await backend.append(make_commit("s1", 0, queue=enqueue("job")))
    cancels = 0
    for moment in range(150):
        task = asyncio.ensure_future(backend.next_due_ms(["job"]))
        for _ in range(moment % 15):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancels += 1  # interrupted in the middle of its round trip
        assert await backend.lease("w", ["job"], 10, LEASE_MS, 10) != []  # not cancelled
        await backend.release("w", "s1")
    assert cancels > 0


async def _until_waiting_on_the_lock(server: PostgresServer, query: str) -> None:
    """Return once a statement beginning with ``query`` waits for a lock on the server."""
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as conn:
        with anyio.fail_after(10):
            while True:
                cursor = await conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND state = 'active' AND wait_event_type = 'Lock' AND query LIKE %s",
                    (f"{query}%",),
                )
                if await cursor.fetchone() is not None:
                    return
                await anyio.sleep(0.01)


def _start_cancellable(
    tg: anyio.abc.TaskGroup, call: Callable[[], Awaitable[object]]
) -> tuple[anyio.CancelScope, anyio.Event]:
    """Run ``call`` in ``tg`` inside a scope of its own; the event is set once it has ended
    (either way)."""
    scope = anyio.CancelScope()
    ended = anyio.Event()

    async def running() -> None:
        with scope:
            try:
                await call()
            finally:
                ended.set()

    tg.start_soon(running)
    return scope, ended


async def test_a_cancelled_read_ends_its_statement_and_keeps_its_connection(
    postgres_server: PostgresServer, backend: PostgresBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker shutting down while a read is in flight (the read-model runner's, say) lets
    the statement end: psycopg is never asked to cancel it, so it never gives that up with a
    warning and a closed connection; the connection goes back to the pool."""
    await backend.append(make_commit("s1", 0))
    kept = list(backend.pool._loop_connections().idle)  # the pool's own idle list
    assert len(kept) == 1
    ended_while_locked = False
    async with await psycopg.AsyncConnection.connect(postgres_server.url()) as locker:
        await locker.execute(f"LOCK TABLE {backend.options.schema}.events IN ACCESS EXCLUSIVE MODE")
        async with anyio.create_task_group() as tg:

            async def reading() -> None:
                await backend.max_position()
                await anyio.sleep(60)  # the cancellation lands here, after the read

            scope, ended = _start_cancellable(tg, reading)
            await _until_waiting_on_the_lock(postgres_server, "SELECT MAX(position)")
            scope.cancel()
            await anyio.sleep(0.2)
            ended_while_locked = ended.is_set()
            await locker.commit()  # the read runs and returns
            with anyio.fail_after(10):
                await ended.wait()
    assert not ended_while_locked  # the cancellation waited for the statement
    assert backend.pool._loop_connections().idle == kept  # the same connection, kept
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]
    assert await backend.max_position() == 1  # and it still serves


@pytest.mark.parametrize("call", ["read", "lease"])
async def test_a_statement_unanswered_past_the_grace_gives_way_to_a_cancellation(
    postgres_server: PostgresServer,
    backend: PostgresBackend,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
) -> None:
    """A server that does not answer does not hold a worker's shutdown: once a call has
    waited the grace, a cancellation interrupts it (here the statement waits on a table lock
    that is held until the call has ended)."""
    monkeypatch.setattr(statement_grace, "STATEMENT_GRACE", 0.5)
    await backend.append(make_commit("s1", 0, queue=enqueue("job")))
    table, query = (
        ("events", "SELECT MAX(position)")
        if call == "read"
        else ("queue", f"UPDATE {backend.options.schema}.queue AS q SET lease_owner")
    )
    async with await psycopg.AsyncConnection.connect(postgres_server.url()) as locker:
        await locker.execute(
            f"LOCK TABLE {backend.options.schema}.{table} IN ACCESS EXCLUSIVE MODE"
        )
        async with anyio.create_task_group() as tg:

            async def calling() -> object:
                if call == "read":
                    return await backend.max_position()
                return await backend.lease("gone", ["job"], 10, LEASE_MS, 10)

            scope, ended = _start_cancellable(tg, calling)
            await _until_waiting_on_the_lock(postgres_server, query)
            scope.cancel()
            with anyio.fail_after(10):  # the lock is still held: only the grace ends it
                await ended.wait()
            await locker.rollback()
