"""Executions waiting for flow control are shown as such and woken when a slot frees: the
status ``throttled`` (the executions index, describe, ``ls --status throttled``) and one
``throttled`` history entry per wait, however often the slot is looked at; a freed slot
wakes the longest waiter at once (with the clock frozen, no retry time ever comes: only the
wake-up can run it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.clock import Clock

pytestmark = pytest.mark.anyio

DEADLINE = 30


class FrozenClock(Clock):
    """Time stands still unless skipped: nothing falls due by itself."""

    def __init__(self) -> None:
        self.moment = datetime(2027, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.moment

    def skip(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "sqlite", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "nats":
        import uuid

        server = request.getfixturevalue("nats_server")
        return f"{server.url}?stream=W{uuid.uuid4().hex[:16]}"
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 's.db'}"


async def test_a_waiting_execution_is_shown_throttled_and_woken_by_the_freed_slot(
    url: str,
) -> None:
    clock = FrozenClock()  # a fallback retry time never comes
    engine = ss.Engine(url, poll_interval=0.01, workers=4, clock=clock)
    release = anyio.Event()
    running: list[int] = []

    @engine.step("thr.one", concurrency=1)
    async def one(ctx: ss.StepContext, n: int) -> int:
        running.append(n)
        if n == 0:
            await ctx.do("hold", release.wait)  # running, holding the one slot
        return n

    async with engine:
        first = await engine.start("thr.one", {"n": 0})
        with anyio.fail_after(DEADLINE):
            while running != [0]:
                await anyio.sleep(0.02)
        second = await engine.start("thr.one", {"n": 1})
        third = await engine.start("thr.one", {"n": 2})
        with anyio.fail_after(DEADLINE):
            while len(await engine.executions(status="throttled")) < 2:
                await anyio.sleep(0.02)
        waiting = {row.execution_id for row in await engine.executions(status="throttled")}
        assert waiting == {second.execution_id, third.execution_id}
        assert (await second.describe()).status == "throttled"
        (entry,) = [
            h for h in await engine.history_of(second.execution_id) if h.type == "throttled"
        ]
        assert entry.details["reason"] == "concurrency"
        assert running == [0]
        release.set()
        # the clock does not move: only the wake-ups of the freed slots run them
        assert await first.result(timeout=DEADLINE) == 0
        assert await second.result(timeout=DEADLINE) == 1
        assert await third.result(timeout=DEADLINE) == 2
        for handle in (second, third):
            events = await engine.events(handle.execution_id)
            throttled = [e for e in events if isinstance(e, ev.StepThrottled)]
            assert len(throttled) == 1  # one entry per wait, not one per look at the slot
            assert (await handle.describe()).status == "completed"
        assert await engine.executions(status="throttled") == []
    await engine.aclose()


async def test_a_rate_limited_execution_is_shown_throttled_until_its_window_has_room() -> None:
    clock = FrozenClock()
    engine = ss.Engine("memory://", poll_interval=0.01, workers=2, clock=clock)

    @engine.step("thr.rated", rate_limit="1/minute")
    async def rated(ctx: ss.StepContext, n: int) -> int:
        return n

    async with engine:
        first = await engine.start("thr.rated", {"n": 1})
        assert await first.result(timeout=DEADLINE) == 1
        second = await engine.start("thr.rated", {"n": 2})
        with anyio.fail_after(DEADLINE):
            while (await second.describe()).status != "throttled":
                await anyio.sleep(0.02)
        (entry,) = [
            h for h in await engine.history_of(second.execution_id) if h.type == "throttled"
        ]
        assert entry.details["reason"] == "rate"
        clock.skip(61)
        assert await second.result(timeout=DEADLINE) == 2
    await engine.aclose()
