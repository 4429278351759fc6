"""A worker rides out its Redis server being SIGKILLed and restarted from its append-only
file: it backs off, its wake-up subscription comes back, and the executions finish with
nothing acknowledged lost and no recorded sub-step run twice."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import stepsource as ss
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
