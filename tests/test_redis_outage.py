"""A worker rides out its Redis server being SIGKILLed and restarted from its append-only
file: it backs off, its wake-up subscription comes back, and the executions finish with
nothing acknowledged lost and no recorded sub-step run twice. A server that stops answering
(SIGSTOP) fails each call within the backend's socket timeout."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.ports import Commit, NewEvent
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.adapters.redis.options import parse_redis_url
from stepsource.errors import BackendUnavailableError
from stepsource.testing.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio API runs on asyncio only


async def test_workers_ride_out_a_redis_server_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        url = f"{server.url}?prefix=OUTAGE&durability=strict"
        engine = ss.Engine(url, poll_interval=0.05, lease_seconds=1, workers=4)
        bodies: list[str] = []

        @engine.step("outage.step")
        async def step(ctx: ss.StepContext, n: int) -> int:
            await ctx.do("before", lambda: bodies.append(f"before-{n}"))
            await ctx.sleep(1.0)  # the outage happens while these wait
            await ctx.do("after", lambda: bodies.append(f"after-{n}"))
            return n

        async with engine:
            handles = [await engine.start("outage.step", {"n": n}) for n in range(6)]
            with anyio.fail_after(20):  # every "before" recorded: each execution went to sleep
                for handle in handles:
                    while not any(
                        type(e).__name__ == "StepSuspended"
                        for e in await engine.events(handle.execution_id)
                    ):
                        await anyio.sleep(0.05)
            server.kill()  # SIGKILL: no goodbye to the clients
            await anyio.sleep(1.5)  # the timers fall due while the server is down
            server.start()
            results = [await h.result(timeout=60) for h in handles]
        assert results == list(range(6))
        for n in range(6):  # each recorded body ran once
            assert bodies.count(f"before-{n}") == 1
            assert bodies.count(f"after-{n}") == 1
        for handle in handles:
            types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
            assert types.count("StepCompleted") == 1
            assert types.count("SubStepCompleted") == 2
        await engine.aclose()


async def test_a_result_awaited_through_a_server_restart_is_returned(tmp_path: Path) -> None:
    """``result(timeout=60)`` raised BackendUnavailableError at the first read the restart
    refused, though the execution went on and completed."""
    with RedisServer(tmp_path / "redis") as server:
        engine = ss.Engine(f"{server.url}?prefix=WAIT", poll_interval=0.05, lease_seconds=1)

        @engine.step("outage.nap")
        async def nap(ctx: ss.StepContext) -> str:
            await ctx.sleep(1.5)
            return "done"

        async with engine:
            handle = await engine.start("outage.nap")
            results: list[str] = []
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    results.append(str(await handle.result(timeout=60)))

                tg.start_soon(wait)
                await anyio.sleep(0.3)  # the waiter is reading the log now
                server.kill()
                await anyio.sleep(1.0)
                server.start()
            assert results == ["done"]
        await engine.aclose()


async def test_a_server_that_stops_answering_fails_each_call_within_the_socket_timeout(
    tmp_path: Path,
) -> None:
    """Commits (the script path) and plain reads (every other call) alike: the server
    process is stopped, not killed, so the connection stays open and only a timeout ends the
    wait; once the server runs again the same backend works."""
    with RedisServer(tmp_path / "redis") as server:
        backend = RedisBackend(parse_redis_url(f"{server.url}?prefix=HUNG"), socket_timeout=0.5)
        event = NewEvent("s", 1, "t", b"{}")
        assert await backend.append(Commit("s", 0, [event])) >= 1
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(10):  # unbounded, the calls would wait for ever
                with pytest.raises(BackendUnavailableError, match=r"no answer within 0\.5 s"):
                    await backend.append(Commit("s", 1, [event._replace(version=2)]))
                with pytest.raises(BackendUnavailableError, match=r"no answer within 0\.5 s"):
                    await backend.stream_version("s")
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await backend.stream_version("s") in (1, 2)  # the unanswered commit may be in
        await backend.aclose()


async def test_sequential_commits_go_on_after_a_server_restart(tmp_path: Path) -> None:
    """The connection a lone commit is sent on is kept between commits: one the server
    closed (killed and restarted from its append-only file) connects again before the next
    commit is sent, as the client's pool does, instead of failing that commit."""
    with RedisServer(tmp_path / "redis") as server:
        backend = RedisBackend(parse_redis_url(f"{server.url}?prefix=RESTART"))
        event = NewEvent("s", 1, "t", b"{}")
        first = await backend.append(Commit("s", 0, [event]))
        server.kill()
        server.start()
        await anyio.sleep(0.2)  # the loop sees the old connection's end (as a worker's would)
        second = await backend.append(Commit("s", 1, [event._replace(version=2)]))
        assert second == first + 1
        assert await backend.stream_version("s") == 2
        await backend.aclose()
