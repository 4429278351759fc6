"""A worker that stops, or an execution that misbehaves, must not cost the others.

- A graceful stop (SIGTERM, the end of ``async with engine``) hands each running attempt
  over, recorded as suspended: the next worker resumes it by replay and the stop is not a
  lost worker. Five rolling restarts during one long step used to fail it at the cutoff.
- An exception whose ``__str__`` raises (even SystemExit) is recorded with a placeholder; in
  a plain ``def`` handler it used to take the whole worker down.
- A handler over its ``timeout`` that never yields to be stopped (it blocks the event loop,
  or catches the cancellation) fails the attempt with TimeoutError; its output was kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.cli_inspect import takeovers
from stepsource.engine.actor import MAX_LOST_WORKERS
from stepsource.engine.handover import STOPPED

pytestmark = pytest.mark.anyio

DEADLINE = 30.0


def long_engine(url: str) -> ss.Engine:
    engine = ss.Engine(url, workers=2, poll_interval=0.02, lease_seconds=3)

    @engine.step("handover.long")
    async def long(ctx: ss.StepContext) -> str:
        await ctx.set_state("phase", "before")
        await ctx.do("work", lambda: anyio.sleep(30))  # every worker stops during it
        return "done"

    @engine.step("handover.quick")
    async def quick(ctx: ss.StepContext) -> str:
        return "quick"

    return engine


async def test_rolling_restarts_hand_an_execution_over_and_never_count_as_lost(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    stops = MAX_LOST_WORKERS + 1
    execution_id = ""
    for n in range(stops):
        engine = long_engine(url)
        async with engine:
            if not execution_id:
                execution_id = (await engine.start("handover.long")).execution_id
            with anyio.fail_after(DEADLINE):  # this worker leased it and runs its body
                while await last_event(engine, execution_id) not in ("StepLeased", "StepStarted"):
                    await anyio.sleep(0.02)
            await anyio.sleep(0.2)
        client = ss.Engine(url, workers=0)
        assert await last_event(client, execution_id) == "StepSuspended", n  # handed over
        await client.aclose()
    client = ss.Engine(url, workers=0)
    events = await client.events(execution_id)
    await client.aclose()
    taken = takeovers(events)
    assert len(taken) == stops - 1  # engines 2 to 6 each resumed what the one before handed over
    assert all(e.details.get("handed_over") is True for e in taken), taken
    reasons = [getattr(e, "reason", None) for e in events if type(e).__name__ == "StepSuspended"]
    assert reasons == [STOPPED] * stops
    assert "StepFailed" not in [type(e).__name__ for e in events]
    finisher = long_engine(url)  # the body would take 30 s: the attempt is still resumable
    async with finisher:
        with anyio.fail_after(DEADLINE):
            while await last_event(finisher, execution_id) not in ("StepLeased", "StepStarted"):
                await anyio.sleep(0.02)
        record = await finisher.describe(execution_id)
    assert record.status in ("executing", "waiting")
    assert record.retry_count == 0


async def last_event(engine: ss.Engine, execution_id: str) -> str:
    return type((await engine.events(execution_id))[-1]).__name__


async def test_a_handed_over_execution_finishes_on_the_next_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    engine = ss.Engine(url, workers=2, poll_interval=0.02)
    gate = {"open": False}

    @engine.step("handover.gated")
    async def gated(ctx: ss.StepContext) -> str:
        await ctx.set_state("seen", True)

        async def wait_for_gate() -> int:
            while not gate["open"]:
                await anyio.sleep(0.02)
            return 7

        return f"value {await ctx.do('gate', wait_for_gate)}"

    async with engine:
        handle = await engine.start("handover.gated")
        with anyio.fail_after(DEADLINE):
            while await last_event(engine, handle.execution_id) != "StepStarted":
                await anyio.sleep(0.02)
        await anyio.sleep(0.2)  # inside the body, waiting for the gate
    gate["open"] = True
    async with engine.derive(workers=2) as worker:
        again = worker.get_handle(handle.execution_id)
        assert await again.result(timeout=DEADLINE) == "value 7"
        kinds = [type(e).__name__ for e in await worker.events(handle.execution_id)]
    assert kinds.count("StepSuspended") == 1
    assert kinds.count("StepStarted") == 1  # the same attempt, resumed by replay
    assert await worker.state_of(handle.execution_id) == {"seen": True}


class SaysNothing(Exception):
    def __str__(self) -> str:
        raise SystemExit("from __str__")


def _raise_says_nothing() -> None:
    raise SaysNothing


@pytest.mark.parametrize("plain", [True, False])
async def test_an_exception_whose_str_raises_fails_only_its_execution(plain: bool) -> None:
    engine = ss.Engine("memory://", workers=4, poll_interval=0.02)

    if plain:

        @engine.step("handover.bad")
        def bad(ctx: ss.SyncStepContext) -> None:
            ctx.do("b", _raise_says_nothing)

    else:

        @engine.step("handover.bad")
        async def bad_async(ctx: ss.StepContext) -> None:
            await ctx.do("b", _raise_says_nothing)

    @engine.step("handover.good")
    async def good(ctx: ss.StepContext, n: int) -> int:
        for i in range(3):
            await ctx.do(f"i{i}", lambda: None)
            await anyio.sleep(0.01)
        return n

    async with engine:
        bad_handle = await engine.start("handover.bad")
        goods = [await engine.start("handover.good", {"n": n}) for n in range(3)]
        with pytest.raises(ss.StepFailedError, match=r"ctx.do\('b'\) failed with SaysNothing"):
            await bad_handle.result(timeout=DEADLINE)
        assert [await g.result(timeout=DEADLINE) for g in goods] == [0, 1, 2]


@pytest.mark.parametrize("how", ["blocks", "swallows"])
async def test_a_handler_that_never_yields_to_its_timeout_fails_with_timeout_error(
    how: str,
) -> None:
    engine = ss.Engine("memory://", workers=2, poll_interval=0.02)

    @engine.step("handover.slow", timeout=0.2)
    async def slow(ctx: ss.StepContext) -> str:
        if how == "blocks":
            time.sleep(0.5)  # noqa: ASYNC251 - the misbehaviour under test
        else:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                try:
                    await anyio.sleep(0.01)
                except anyio.get_cancelled_exc_class():  # swallowed: the misbehaviour under test
                    pass
        return "kept?"

    async with engine:
        handle = await engine.start("handover.slow")
        with pytest.raises(ss.StepFailedError, match="TimeoutError: the handler ran past"):
            await handle.result(timeout=DEADLINE)
