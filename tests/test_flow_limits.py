"""Flow control in one process: refused settings, a rate limit over simulated minutes (and
the sliding window's invariant under hypothesis), and a suspended execution holding no slot."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.engine.flowcontrol import take_rate
from stepsource.testing import SkippingClock

pytestmark = pytest.mark.anyio

DEADLINE = 30


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"concurrency": 0}, "concurrency must be an int >= 1"),
        ({"concurrency": True}, "concurrency must be an int >= 1"),
        ({"concurrency": "2"}, "concurrency must be an int >= 1"),
        ({"concurrency": 2, "concurrency_key": 3}, "concurrency_key must be an input field"),
        ({"concurrency_key": "customer"}, "concurrency_key needs concurrency="),
        ({"rate_limit": "fast"}, "rate_limit must read like '100/minute'"),
        ({"rate_limit": "0/minute"}, "rate_limit must read like '100/minute'"),
        ({"rate_limit": "5/fortnight"}, "rate_limit must read like '100/minute'"),
        ({"rate_limit": 100}, "rate_limit must read like '100/minute'"),
        # accepted before, and then no execution ever ran: every admission failed to store
        # a window of 0 ms, or one beyond 64 bits of milliseconds
        ({"rate_limit": "5/000seconds"}, "a window of 1 second to 366 days"),
        ({"rate_limit": "1/99999999999999999999day"}, "a window of 1 second to 366 days"),
        ({"rate_limit": "1/367days"}, "a window of 1 second to 366 days"),
    ],
)
def test_bad_limits_are_refused_when_the_step_is_declared(
    options: dict[str, object], named: str
) -> None:
    engine = ss.Engine("memory://")
    with pytest.raises(ss.StepsourceError, match=named) as caught:

        @engine.step("limits.bad", **options)  # type: ignore[arg-type]
        async def bad(ctx: ss.StepContext) -> None: ...

    assert "limits.bad" in str(caught.value)
    assert engine.step_ids() == []


def windows_hold(starts: Sequence[int], limit: int, window_ms: int) -> bool:
    """No window of ``window_ms`` holds more than ``limit`` of the sorted ``starts``."""
    return all(starts[i + limit] - starts[i] >= window_ms for i in range(len(starts) - limit))


async def test_a_rate_limit_holds_over_minutes_of_simulated_time() -> None:
    clock = SkippingClock(auto=True)  # an idle pool skips to when the window has room
    engine = ss.Engine("memory://", poll_interval=0.01, clock=clock, workers=8)

    @engine.step("limits.rated", rate_limit="5/minute")
    async def rated(ctx: ss.StepContext, n: int) -> int:
        return n

    async with engine:
        began = clock.now()
        handles = [await engine.start("limits.rated", {"n": n}) for n in range(23)]
        assert [await h.result(timeout=DEADLINE) for h in handles] == list(range(23))
    starts: list[datetime] = []
    for handle in handles:
        events = await engine.events(handle.execution_id)
        starts += [e.timestamp for e in events if type(e).__name__ == "StepStarted"]
    ms = sorted(int(s.timestamp() * 1000) for s in starts)
    assert len(ms) == 23
    # a start is recorded a moment after its admission (which the window counts): no more
    # than 5 began in any window of a minute less that moment
    assert windows_hold(ms, 5, 59_000)
    # 23 starts at 5 a minute need four full minutes past the first five: the limit did wait
    assert max(starts) - began >= timedelta(minutes=4)


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(1, 6),
    gaps=st.lists(st.integers(0, 30_000), min_size=1, max_size=40),
)
def test_the_sliding_window_never_admits_more_than_the_limit(limit: int, gaps: list[int]) -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        now, admitted = 1_000_000, list[int]()
        for gap in gaps:
            now += gap
            retry_at = await take_rate(backend, "rate", limit, 60_000, now)
            recent = [t for t in admitted if t > now - 60_000]
            if retry_at is None:
                admitted.append(now)
            else:  # refused only when the window is full, until the oldest leaves it
                assert len(recent) >= limit
                assert retry_at == sorted(recent)[-limit] + 60_000
        assert windows_hold(admitted, limit, 60_000)

    anyio.run(scenario)


async def test_a_suspended_execution_holds_no_slot() -> None:
    clock = SkippingClock(auto=False)
    engine = ss.Engine("memory://", poll_interval=0.01, clock=clock, workers=4)

    @engine.step("limits.single", concurrency=1)
    async def single(ctx: ss.StepContext, nap: float) -> str:
        if nap:
            await ctx.sleep(nap)
        return "done"

    async with engine:
        sleeper = await engine.start("limits.single", {"nap": 3600})
        with anyio.fail_after(DEADLINE):
            while (await sleeper.describe()).status != "waiting":
                await anyio.sleep(0.02)
        # the only slot is free while the sleeper sleeps: another execution runs meanwhile
        quick = await engine.start("limits.single", {"nap": 0})
        assert await quick.result(timeout=DEADLINE) == "done"
        assert (await sleeper.describe()).status == "waiting"
        clock.skip(3600)
        assert await sleeper.result(timeout=DEADLINE) == "done"


async def test_a_busy_slot_makes_the_next_execution_wait_for_it(backend_url: str) -> None:
    """On every backend: the slots live in its global key-value store."""
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=4)
    release = anyio.Event()
    running: list[int] = []

    @engine.step("limits.one", concurrency=1)
    async def one(ctx: ss.StepContext, n: int) -> int:
        running.append(n)
        if n == 0:
            await release.wait()
        return n

    async with engine:
        first = await engine.start("limits.one", {"n": 0})
        with anyio.fail_after(DEADLINE):
            while running != [0]:
                await anyio.sleep(0.02)
        second = await engine.start("limits.one", {"n": 1})
        await anyio.sleep(0.5)  # four workers are free: only the slot holds it back
        assert running == [0]
        # it holds no worker: between two looks at the slot (each a moment
        # long) only the first execution is live
        with anyio.fail_after(DEADLINE):
            while engine.live_executions() != [first.execution_id]:
                await anyio.sleep(0.005)
        release.set()
        assert await second.result(timeout=DEADLINE) == 1
        assert await first.result(timeout=DEADLINE) == 0
    await engine.aclose()


async def test_a_concurrency_key_reads_the_input_with_its_defaults(tmp_path: Path) -> None:
    """An input that leaves the keyed parameter out counts at its default: it went into a
    slot of its own ('') and ran beside an execution of the same key."""
    engine = ss.Engine(f"sqlite:///{tmp_path / 'keys.db'}", poll_interval=0.01, workers=4)
    release = anyio.Event()
    running: list[str] = []

    @engine.step("limits.tenant", concurrency=1, concurrency_key="tenant")
    async def per_tenant(ctx: ss.StepContext, label: str, tenant: str = "acme") -> str:
        running.append(label)
        if label == "explicit":
            await release.wait()
        return label

    async with engine:
        first = await engine.start("limits.tenant", {"label": "explicit", "tenant": "acme"})
        with anyio.fail_after(DEADLINE):
            while running != ["explicit"]:
                await anyio.sleep(0.02)
        second = await engine.start("limits.tenant", {"label": "omitted"})
        await anyio.sleep(0.5)  # four workers are free: only the slot holds it back
        assert running == ["explicit"]
        release.set()
        assert await second.result(timeout=DEADLINE) == "omitted"
        assert await first.result(timeout=DEADLINE) == "explicit"


async def test_a_key_function_that_cannot_answer_an_input_fails_the_execution(
    tmp_path: Path,
) -> None:
    """Where the step is registered, ``engine.start`` refuses the input at once; an execution
    started by a process without it fails its attempt with the key's error. It stayed
    'scheduled' for ever, released and leased again every lease period."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    def define(engine: ss.Engine) -> None:
        @engine.step("limits.region", concurrency=1, concurrency_key=lambda data: data["zone"])
        async def region(ctx: ss.StepContext, n: int) -> int:
            return n

    engine = ss.Engine(url, poll_interval=0.01, workers=2)
    define(engine)
    client = ss.Engine(url, workers=0)  # starts by name: the step is not registered here
    async with engine, client:
        with pytest.raises(ss.UsageError) as refused:
            await engine.start("limits.region", {"n": 1})
        assert refused.value.reason == (
            "concurrency_key of step 'limits.region' raised KeyError: 'zone' for this input"
        )
        assert refused.value.hint is not None
        assert "data.get(" in refused.value.hint
        assert await engine.executions(step_id="limits.region") == []  # nothing appended
        handle = await client.start("limits.region", {"n": 1})
        with pytest.raises(ss.StepFailedError) as failed:
            await handle.result(timeout=DEADLINE)
        assert "concurrency_key of step 'limits.region' raised KeyError" in str(failed.value)
        assert (await handle.describe()).status == "failed"


async def test_a_concurrency_key_reads_the_migrated_input(tmp_path: Path) -> None:
    """The key's input is migrated for a handler that takes only the context too (it read
    the stored input, so an old-shaped start took a slot of its own)."""
    engine = ss.Engine(f"sqlite:///{tmp_path / 'keys.db'}", poll_interval=0.01, workers=4)
    release = anyio.Event()
    running: list[str] = []

    def rename(data: dict[str, Any]) -> dict[str, Any]:
        if "region_code" in data:
            data["region"] = data.pop("region_code")
        return data

    @engine.step("limits.migrated", concurrency=1, concurrency_key="region", migrate_input=rename)
    async def migrated(ctx: ss.StepContext) -> str:
        label = str(ctx.input_data.get("label"))
        running.append(label)
        if label == "first":
            await release.wait()
        return label

    async with engine:
        first = await engine.start("limits.migrated", {"label": "first", "region": "eu"})
        with anyio.fail_after(DEADLINE):
            while running != ["first"]:
                await anyio.sleep(0.02)
        old_shape = await engine.start("limits.migrated", {"label": "old", "region_code": "eu"})
        await anyio.sleep(0.5)  # four workers are free: only the slot holds it back
        assert running == ["first"]
        release.set()
        assert await old_shape.result(timeout=DEADLINE) == "old"
        assert await first.result(timeout=DEADLINE) == "first"
