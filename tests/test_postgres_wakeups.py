"""Wake-ups between processes over PostgreSQL's LISTEN/NOTIFY: a worker learns of work
another engine queued without waiting for its next poll."""

from __future__ import annotations

import uuid

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.contract import enqueue, make_commit
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.testing.postgres_server import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

#: far beyond the tests' deadlines: only a pushed wake-up can make them pass
_NEVER = 300.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_watch_wakes_on_another_connections_commits_and_posts(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    listener, writer = PostgresBackend.from_url(url), PostgresBackend.from_url(url)
    other = PostgresBackend.from_url(postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}"))
    woken = 0
    changed = anyio.Event()

    def wake() -> None:
        nonlocal woken, changed
        woken += 1
        changed.set()

    async def next_wake() -> None:
        nonlocal changed
        with anyio.fail_after(10):
            await changed.wait()
        changed = anyio.Event()

    async with anyio.create_task_group() as group:
        group.start_soon(listener.watch, wake)
        await next_wake()  # the wake-up every (re)connect gives: it listens now
        await writer.append(make_commit("s", 0, queue=enqueue("step")))
        await next_wake()
        await writer.post("s", "signal", "go", b"", 0)
        await next_wake()
        await other.post("s", "signal", "go", b"", 0)  # another schema: not ours
        await writer.append(make_commit("s", 1))  # progress without a queue change: silent
        await writer.append(make_commit("s", 2, queue=enqueue("step")))
        await next_wake()
        assert woken == 4
        group.cancel_scope.cancel()
    for backend in (listener, writer, other):
        await backend.aclose()


async def test_a_worker_engine_is_woken_by_another_engines_start(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    worker = ss.Engine(url, workers=2, poll_interval=_NEVER)
    client = ss.Engine(url, workers=0, poll_interval=_NEVER)

    @worker.step("wake.double")
    async def double(ctx: ss.StepContext, n: int) -> int:
        return 2 * n

    client.step("wake.double")(double)  # the client validates input locally
    async with worker, client:
        await anyio.sleep(0.2)  # the worker leased once and found nothing: it sleeps
        handles = [await client.start("wake.double", {"n": n}) for n in range(3)]
        with anyio.fail_after(30):
            assert [await handle.result() for handle in handles] == [0, 2, 4]
