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
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest

from stepsource.adapters.contract import enqueue, make_commit
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
