"""Wake-ups from the Redis server: every commit, post and release is announced on the
prefix's pub/sub channel, and an engine inside ``async with`` listens, so work started or
signalled by another process is picked up at once rather than at the next poll."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.contract import enqueue, make_commit
from stepsource.adapters.ports import QueueUpdate
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.testing.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


def lease_update() -> QueueUpdate:
    return QueueUpdate("lease", "step", 0, due_ms=0, owner="me", lease_expires_ms=10**12)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# redis_server: the session's server (tests/conftest.py), on a key prefix of each test's own


def url_of(server: RedisServer) -> str:
    return f"{server.url}?prefix=W{uuid.uuid4().hex[:12]}&durability=off"


@pytest.mark.anyio
async def test_watch_reports_other_connections_changes(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    url = url_of(redis_server)
    watcher, writer = RedisBackend.from_url(url), RedisBackend.from_url(url)
    work: list[None] = []
    changed: list[str] = []
    async with anyio.create_task_group() as group:
        await group.start(watcher.watch, lambda: work.append(None), changed.append)
        await writer.append(make_commit("plain", 0))  # mid-execution: nothing announced
        await writer.append(make_commit("leased", 0, queue=lease_update()))  # a change
        await writer.append(make_commit("queued", 0, queue=enqueue("step")))
        await writer.post("asleep", "signal", "go", b"{}", 0)
        await writer.lease("w", ["step"], 0, 1000, 1)
        await writer.release("w", "queued")
        await writer.append(make_commit("queued", 1, queue=QueueUpdate("done")))
        with anyio.fail_after(10):
            while len(changed) < 5:
                await anyio.sleep(0.01)
        group.cancel_scope.cancel()
    assert changed == ["leased", "queued", "asleep", "queued", "queued"]
    assert len(work) == 3  # the enqueue, the post and the release
    await watcher.aclose()
    await writer.aclose()


@pytest.mark.anyio
async def test_work_from_another_engine_is_picked_up_without_waiting_for_a_poll(
    redis_server: RedisServer, tmp_path: Path, anyio_backend: str
) -> None:
    """Both engines poll once a minute only: the start, the signal and the result can
    only cross between them within the deadline by the server's wake-ups."""
    url = url_of(redis_server)
    worker = ss.Engine(url, poll_interval=60)
    client = ss.Engine(url, poll_interval=60, workers=0)

    @worker.step("greet")
    async def greet(ctx: ss.StepContext, name: str) -> str:
        answer = await ctx.wait_for_event("go", timeout=30)
        return f"hello {name}, {answer}"

    async with worker, client:
        with anyio.fail_after(20):
            await anyio.sleep(0.2)  # the worker's first poll has found nothing
            handle = await client.start("greet", {"name": "ada"})
            while (await client.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.05)
            await handle.send_event("go", "welcome")
            assert await handle.result(timeout=15) == "hello ada, welcome"
