"""stepsource.testing: crash_everywhere, the time-skipping clock and the fixtures."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource import demo
from stepsource.testing import ReplayMismatch, SkippingClock, crash_everywhere

pytestmark = pytest.mark.anyio


async def test_crash_everywhere_passes_on_the_batch_processing_example_committing_each() -> None:
    engine = ss.Engine("memory://", durability="each")
    demo.register(engine)
    report = await crash_everywhere(
        engine, demo.STEP_ID, {"items": demo.sample_items(), "batch_size": 10}
    )
    assert report.durability == "each"
    assert report.commits > 25
    assert report.boundaries_tried == report.commits - 1
    assert report.boundaries[0].last_event == "StepScheduled"
    assert {b.last_event for b in report.boundaries} >= {"CheckpointRestored", "StateSet"}
    assert report.operations_tried == report.operations > 25


async def test_crash_everywhere_drops_the_buffer_at_every_operation_of_the_batch_example() -> None:
    """Under the default durability the batch example's state writes, checkpoints and
    restores are buffered between its side effects: a crash at any operation loses what is
    buffered, and the resumed run still ends exactly as the uninterrupted one."""
    engine = ss.Engine("memory://")
    demo.register(engine)
    report = await crash_everywhere(
        engine, demo.STEP_ID, {"items": demo.sample_items(), "batch_size": 10}
    )
    assert report.durability == "boundary"
    assert report.commits < report.operations  # operations share commits
    assert report.operations_tried == report.operations > 25
    operations = {b.operation for b in report.boundaries if b.kind == "operation"}
    assert {"set_state", "create_checkpoint", "restore_from_checkpoint"} <= operations
    # a crash at an operation can leave the log where an earlier commit ended: buffered work
    # is gone, and nothing after the last boundary is in the log
    lost = [b for b in report.boundaries if b.kind == "operation" and b.reached]
    assert any(b.last_event in ("StepStarted", "SubStepCompleted") for b in lost)


async def test_crash_everywhere_with_substeps_values_and_a_long_sleep() -> None:
    engine = ss.Engine("memory://")
    effects: list[str] = []

    @engine.step("toolkit.mixed")
    async def mixed(ctx: ss.StepContext, n: int) -> dict[str, Any]:
        token = await ctx.uuid4()

        def effect(name: str, value: int) -> int:
            effects.append(name)
            return value

        first = await ctx.do("reserve", lambda: effect("reserve", n))
        await ctx.sleep(3600)  # an hour: the skipping clock makes it instant
        roll = await ctx.random()
        await ctx.create_checkpoint({"phase": "reserved"}, cursor=first)
        second = await ctx.do("charge", lambda: effect("charge", n * 2))
        await ctx.update_state({"token": str(token), "roll": roll})
        return {"first": first, "second": second, "token": str(token)}

    for durability in ("boundary", "each"):
        report = await crash_everywhere(
            engine, "toolkit.mixed", {"n": 21}, clock=SkippingClock(), durability=durability
        )
        assert report.boundaries_tried == report.commits - 1
        assert report.operations_tried == report.operations
        # a body killed before its record may run again; a recorded one never does
        for boundary in report.boundaries:
            assert set(boundary.bodies_rerun) <= {"reserve", "charge"}


async def test_crash_everywhere_reports_a_side_effect_outside_do() -> None:
    engine = ss.Engine("memory://")
    charges: list[int] = []

    @engine.step("toolkit.double_charge")
    async def double_charge(ctx: ss.StepContext, amount: int) -> dict[str, int]:
        await ctx.set_state("status", "charging")
        charges.append(amount)  # BUG: a side effect outside ctx.do runs again on resume
        charge_id = len(charges)
        await ctx.set_state("status", "charged")
        return {"charge_id": charge_id}

    with pytest.raises(ReplayMismatch) as caught:
        await crash_everywhere(engine, "toolkit.double_charge", {"amount": 5})
    message = str(caught.value)
    assert "boundary" in message
    assert "output differs" in message
    assert "right after event" in message
    assert isinstance(caught.value, AssertionError)


async def test_crash_everywhere_refuses_an_unknown_step() -> None:
    with pytest.raises(ss.UnknownStepError):
        await crash_everywhere(ss.Engine("memory://"), "nope")


async def test_crash_everywhere_never_passes_a_run_that_did_not_finish() -> None:
    """A run cut by its timeout while still executing was compared as it stood: a step
    slower than the timeout (or a timeout of -1) passed having checked nothing."""
    engine = ss.Engine("memory://", workers=0)

    @engine.step("slow")
    async def slow(ctx: ss.StepContext) -> str:
        await ctx.set_state("began", True)
        await ctx.do("long", lambda: anyio.sleep(2))
        return "done"

    with pytest.raises(ReplayMismatch) as unfinished:
        await crash_everywhere(engine, "slow", timeout=0.3)
    assert str(unfinished.value) == (
        "the run of 'slow' neither ended nor waited within timeout=0.3 s (its status: "
        "executing); a longer step needs a larger timeout"
    )
    for timeout in (-1, 0, float("nan")):
        with pytest.raises(ss.UsageError, match="needs a timeout of seconds > 0"):
            await crash_everywhere(engine, "slow", timeout=timeout)


async def test_crash_everywhere_tells_a_childs_body_from_its_parents_of_the_same_name() -> None:
    engine = ss.Engine("memory://")
    runs: list[str] = []

    def fetch(who: str, value: int) -> int:
        runs.append(who)
        return value

    @engine.step("toolkit.child")
    async def child(ctx: ss.StepContext, n: int) -> int:
        return int(await ctx.do("fetch", lambda: fetch("child", n * 10)))

    @engine.step("toolkit.parent")
    async def parent(ctx: ss.StepContext) -> int:
        a = int(await ctx.do("fetch", lambda: fetch("parent", 1)))
        return a + int(await ctx.run_step("toolkit.child", {"n": a}))

    # the child's "fetch" running for the first time after a crash in the parent was taken
    # for the parent's recorded "fetch" running again
    report = await crash_everywhere(engine, "toolkit.parent")
    assert report.boundaries_tried == report.commits - 1 > 3
    assert "child" in runs


async def test_crash_everywhere_names_the_divergence_of_a_parked_run_without_waiting() -> None:
    engine = ss.Engine("memory://")
    runs = {"n": 0}

    @engine.step("toolkit.branchy")
    async def branchy(ctx: ss.StepContext) -> int:
        runs["n"] += 1  # BUG: the branch depends on how often the handler ran
        await ctx.do("x" if runs["n"] % 2 else "y", lambda: 1)
        return 1

    # it said the run "neither ended nor waited within timeout=60 s", a minute later
    with anyio.fail_after(30), pytest.raises(ReplayMismatch) as caught:
        await crash_everywhere(engine, "toolkit.branchy")
    message = str(caught.value)
    assert "resumed after a crash, was parked by the engine" in message
    assert "NonDeterminismError" in message
    assert "ctx.do('x')" in message or "ctx.do('y')" in message


async def test_crash_everywhere_compares_a_run_resting_on_a_far_timer_without_waiting() -> None:
    engine = ss.Engine("memory://")

    @engine.step("toolkit.remind")
    async def remind(ctx: ss.StepContext) -> str:
        await ctx.set_state("s", 1)
        await ctx.sleep(3600)  # on the real clock: never due within the runs' bound
        return "sent"

    # every run waited out its whole bound (60 s) before it was compared
    with anyio.fail_after(30):
        report = await crash_everywhere(engine, "toolkit.remind")
    assert report.boundaries_tried == report.commits - 1 > 1


async def test_the_memory_engine_fixture_skips_idle_time(
    stepsource_memory_engine: ss.Engine, stepsource_clock: SkippingClock
) -> None:
    engine = stepsource_memory_engine

    @engine.step("toolkit.nap")
    async def nap(ctx: ss.StepContext) -> str:
        before = await ctx.now()
        await ctx.sleep(24 * 3600)
        after = await ctx.now()
        return str(round((after - before).total_seconds() / 3600))

    async with engine:
        handle = await engine.start("toolkit.nap")
        assert await handle.result(timeout=10) == "24"  # a day passed on the test clock


async def test_the_sqlite_engine_fixture_uses_a_real_file(
    stepsource_sqlite_engine: ss.Engine,
) -> None:
    engine = stepsource_sqlite_engine
    assert engine.url is not None
    assert engine.url.startswith("sqlite:///")

    @engine.step("toolkit.file")
    async def handler(ctx: ss.StepContext) -> int:
        await ctx.set_state("x", 1)
        return 1

    async with engine:
        assert await (await engine.start("toolkit.file")).result(timeout=10) == 1
