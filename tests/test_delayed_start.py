"""Delayed starts: ``engine.start(..., delay=...)`` or ``start_at=...`` waits in the queue,
holding no worker, until it is due; refused arguments store nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

import stepsource as ss
from stepsource.engine.clock import Clock
from stepsource.testing import SkippingClock

pytestmark = pytest.mark.anyio

DEADLINE = 30


def make(clock: Clock | None = None) -> ss.Engine:
    engine = ss.Engine("memory://", poll_interval=0.01, clock=clock)

    @engine.step("later.hello")
    async def hello(ctx: ss.StepContext, name: str) -> str:
        return f"hello {name}"

    return engine


async def test_a_delayed_start_runs_when_due_and_not_before() -> None:
    clock = SkippingClock(auto=False)
    engine = make(clock)
    async with engine:
        began = clock.now()
        handle = await engine.start("later.hello", {"name": "later"}, delay=3600)
        await anyio.sleep(0.2)  # a worker is free: it must still leave the execution alone
        assert (await engine.describe(handle.execution_id)).status == "scheduled"
        assert engine.live_executions() == []
        clock.skip(3600)
        assert await handle.result(timeout=DEADLINE) == "hello later"
    events = await engine.events(handle.execution_id)
    started = next(e for e in events if type(e).__name__ == "StepStarted")
    assert started.timestamp >= began + timedelta(seconds=3600)


async def test_start_at_in_the_past_runs_at_once_and_in_the_future_waits() -> None:
    clock = SkippingClock(auto=True)  # an idle pool skips to the next due time
    engine = make(clock)
    async with engine:
        now = clock.now()
        past = await engine.start("later.hello", {"name": "past"}, start_at=now - timedelta(1))
        future_at = (now + timedelta(days=2)).replace(microsecond=0)  # times are in ms
        future = await engine.start("later.hello", {"name": "future"}, start_at=future_at)
        assert await past.result(timeout=DEADLINE) == "hello past"
        assert await future.result(timeout=DEADLINE) == "hello future"
    started = [
        e for e in await engine.events(future.execution_id) if type(e).__name__ == "StepStarted"
    ]
    assert started[0].timestamp >= future_at


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, r"delay must be a number of seconds from 0 to 10\*\*9"),
        ({"delay": float("nan")}, r"delay must be a number of seconds from 0 to 10\*\*9"),
        # refused for its size, which the message said was "not >= 0"
        ({"delay": 1e15}, r"from 0 to 10\*\*9 \(about 31 years\), not 1000000000000000.0"),
        ({"start_at": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"delay": 5, "start_at": datetime.now(UTC)}, "not both"),
    ],
)
async def test_a_bad_delay_is_refused_before_anything_is_stored(
    options: dict[str, object], message: str
) -> None:
    engine = make()
    with pytest.raises(ss.UsageError, match=message):
        await engine.start("later.hello", {"name": "x"}, **options)  # type: ignore[call-overload]
    assert await engine.executions() == []
