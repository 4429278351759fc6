"""Global-scope state: shared across executions, TTL expiry, compare-and-set."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stepsource as ss
from stepsource.testing import SkippingClock

pytestmark = pytest.mark.anyio


async def test_global_state_is_shared_and_expires_by_ttl(backend_url: str) -> None:
    clock = SkippingClock(auto=False)
    engine = ss.Engine(backend_url, poll_interval=0.01, clock=clock)

    @engine.step("global.write")
    async def write(ctx: ss.StepContext, key: str, value: Any, ttl: float | None = None) -> None:
        await ctx.set_global_state(key, value, ttl=ttl)

    @engine.step("global.read")
    async def read(ctx: ss.StepContext, key: str) -> Any:
        return await ctx.get_global_state(key, "absent")

    async def run(step: str, payload: dict[str, Any]) -> Any:
        return await (await engine.start(step, payload)).result(timeout=10)

    async with engine:
        await run("global.write", {"key": "apiQuota", "value": 100, "ttl": 3600})
        await run("global.write", {"key": "config", "value": {"mode": "fast"}})
        assert await run("global.read", {"key": "apiQuota"}) == 100
        clock.skip(3599)
        assert await run("global.read", {"key": "apiQuota"}) == 100
        clock.skip(2)
        assert await run("global.read", {"key": "apiQuota"}) == "absent"  # expired
        assert await run("global.read", {"key": "config"}) == {"mode": "fast"}  # no TTL


async def test_reads_are_recorded_so_a_replay_sees_the_same_value(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    paused = anyio.Event()
    runs: list[Any] = []

    @engine.step("global.replay")
    async def replayed(ctx: ss.StepContext) -> Any:
        seen = await ctx.get_global_state("flag")
        runs.append(seen)
        if len(runs) == 1:
            paused.set()
            await anyio.sleep_forever()  # the worker goes away here
        return seen

    @engine.step("global.flip")
    async def flip(ctx: ss.StepContext, value: str) -> None:
        await ctx.set_global_state("flag", value)

    async with engine:
        await (await engine.start("global.flip", {"value": "before"})).result(timeout=10)
        handle = await engine.start("global.replay")
        await paused.wait()
    async with engine:
        await (await engine.start("global.flip", {"value": "after"})).result(timeout=10)
        assert await handle.result(timeout=10) == "before"  # the recorded read, not a new one
    assert runs == ["before", "before"]
    types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert types.count("GlobalStateRead") == 1


async def test_compare_and_set_counts_exactly_under_contention(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=6)

    @engine.step("quota.take")
    async def take(ctx: ss.StepContext, n: int) -> int:
        attempts = 0
        while True:  # the rate-limit / quota pattern: read, then swap if nobody else did
            attempts += 1
            current = await ctx.get_global_state("quota")
            if await ctx.compare_and_set_global_state("quota", current, (current or 0) + 1):
                return attempts
            await anyio.lowlevel.checkpoint()

    @engine.step("quota.read")
    async def read(ctx: ss.StepContext) -> Any:
        return await ctx.get_global_state("quota")

    async with engine:
        handles = [await engine.start("quota.take", {"n": n}) for n in range(12)]
        attempts: list[Any] = [await h.result(timeout=30) for h in handles]
        assert await (await engine.start("quota.read")).result(timeout=10) == 12
    assert all(a >= 1 for a in attempts)


async def test_a_swap_re_run_after_a_cut_finds_its_write_though_others_swapped_since(
    backend_url: str,
) -> None:
    """The swap is stored, then the backend is cut before its record commits; meanwhile
    another execution swaps the value again. The re-run found the value changed and
    reported its swap refused: the counter loop incremented a second time."""
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=2, lease_seconds=1)

    @engine.step("gs.incr")
    async def incr(ctx: ss.StepContext) -> int:
        while True:
            seen = await ctx.get_global_state("counter", 0)
            if await ctx.compare_and_set_global_state("counter", seen or None, seen + 1):
                return int(seen) + 1

    @engine.step("gs.read")
    async def read(ctx: ss.StepContext) -> Any:
        return await ctx.get_global_state("counter")

    async with engine:
        backend = engine.store.backend
        real = backend.kv_compare_and_set
        cuts: list[str] = []

        async def stored_then_cut(*args: Any) -> Any:
            revision = await real(*args)
            if not cuts:
                cuts.append("cut")
                other = await engine.start("gs.incr")
                assert await other.result(timeout=30) == 2
                raise ss.BackendUnavailableError("the connection was cut after the write")
            return revision

        backend.kv_compare_and_set = stored_then_cut  # type: ignore[method-assign,assignment]
        first = await engine.start("gs.incr")
        assert await first.result(timeout=30) == 1
        assert cuts == ["cut"]
        assert await (await engine.start("gs.read")).result(timeout=10) == 2


async def test_a_refused_swap_is_recorded_and_reported(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("swap.refused")
    async def swap(ctx: ss.StepContext) -> list[bool]:
        await ctx.set_global_state("lock", "held-by-other")
        first = await ctx.compare_and_set_global_state("lock", None, "mine")
        second = await ctx.compare_and_set_global_state("lock", "held-by-other", "mine")
        return [first, second]

    async with engine:
        handle = await engine.start("swap.refused")
        assert await handle.result(timeout=10) == [False, True]
    types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert types.count("GlobalStateSwapRefused") == 1
    assert types.count("GlobalStateWritten") == 2


async def test_a_value_too_large_to_record_is_never_stored(backend_url: str) -> None:
    """The write came before its record: a value over the payload limit was stored, the
    writer failed, and every execution reading the key failed in its turn (its read could
    not be recorded). It is refused before the store is written, as a CAS is."""
    engine = ss.Engine(backend_url, poll_interval=0.01, max_payload_bytes=4096)
    large = "x" * 5000

    @engine.step("gs.writer")
    async def writer(ctx: ss.StepContext) -> list[str]:
        refused = []
        for write in (
            lambda: ctx.set_global_state("report", large),
            lambda: ctx.compare_and_set_global_state("report", None, large),
        ):
            try:
                await write()
            except ss.LimitExceededError as error:
                refused.append(error.reason)
        await ctx.set_global_state("report", "small")  # the key is still usable
        return refused

    @engine.step("gs.reader")
    async def reader(ctx: ss.StepContext) -> Any:
        return await ctx.get_global_state("report")

    async with engine:
        refused = await (await engine.start(writer)).result(timeout=20)
        assert await (await engine.start("gs.reader")).result(timeout=20) == "small"
    assert len(refused) == 2
    assert all(r.startswith("GlobalStateWritten would carry 5") for r in refused)
    assert all(r.endswith("over the payload limit of 4096") for r in refused)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (5, "ctx.set_global_state() needs a non-empty str key, not an int"),
        ("", "ctx.set_global_state() needs a non-empty str key, not an empty one"),
        ("k" * 600, "a key-value key must be 1 to 512 characters long, not 600"),
        ("a\x00b", "a key-value key may not contain NUL"),
    ],
)
async def test_a_key_no_backend_holds_is_refused_naming_the_execution(
    key: object, text: str
) -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("gs.key")
    async def bad_key(ctx: ss.StepContext) -> None:
        await ctx.set_global_state(key, 1)  # type: ignore[arg-type]

    async with engine:
        handle = await engine.start("gs.key")
        with pytest.raises(ss.StepFailedError) as failed:
            await handle.result(timeout=20)
    message = str(failed.value)
    assert f"stepsource.errors.UsageError: {text}" in message
    assert message.count(handle.execution_id) == 1  # named once, at the end
    assert f"(step 'gs.key', execution {handle.execution_id})" in message
