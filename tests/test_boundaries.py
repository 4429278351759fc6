"""Commits at side-effect boundaries: what is buffered, when it becomes durable, and what a
handler that only records deterministic operations still owes the rest of the worker.

The property that boundary commits end where per-operation commits end, and that a crash at
any operation costs nothing, is in test_durability_properties.py; the idempotency key and the
timed-out wait across a real SIGKILL are in test_worker_process.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stepsource as ss
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.engine.definitions import Durability
from stepsource.engine.recorder import MAX_BUFFERED_EVENTS
from stepsource.testing import SkippingClock

pytestmark = pytest.mark.anyio

DEADLINE = 30


async def types_of(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


async def test_observers_see_buffered_operations_only_once_a_boundary_commits_them() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    flushed, in_first_body, in_second_body = anyio.Event(), anyio.Event(), anyio.Event()
    gates = [anyio.Event() for _ in range(3)]

    @engine.step("b.visible")
    async def visible(ctx: ss.StepContext) -> None:
        await ctx.set_state("a", 1)
        await ctx.flush()
        flushed.set()
        await gates[0].wait()
        await ctx.set_state("b", 2)

        async def body(entered: anyio.Event, gate: anyio.Event) -> int:
            entered.set()
            await gate.wait()
            return 0

        await ctx.do("plain", lambda: body(in_first_body, gates[1]))
        await ctx.set_state("c", 3)
        await ctx.do("flushed first", lambda: body(in_second_body, gates[2]), flush_first=True)

    async with engine:
        handle = await engine.start("b.visible")
        await flushed.wait()
        assert await engine.state_of(handle.execution_id) == {"a": 1}
        gates[0].set()
        await in_first_body.wait()
        # b is buffered: the body of "plain" runs from it, observers do not see it yet
        assert await engine.state_of(handle.execution_id) == {"a": 1}
        gates[1].set()
        await in_second_body.wait()
        # "plain"'s result committed b; flush_first committed c before the second body ran
        assert await engine.state_of(handle.execution_id) == {"a": 1, "b": 2, "c": 3}
        gates[2].set()
        await handle.result(timeout=DEADLINE)


async def test_a_full_buffer_is_committed_without_waiting_for_a_boundary() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    written, release = anyio.Event(), anyio.Event()
    count = MAX_BUFFERED_EVENTS + 10

    @engine.step("b.many")
    async def many(ctx: ss.StepContext) -> None:
        for i in range(count):
            await ctx.set_state("i", i)
        written.set()
        await release.wait()

    async with engine:
        handle = await engine.start("b.many")
        await written.wait()
        durable = await types_of(engine, handle.execution_id)
        # the first MAX_BUFFERED_EVENTS state writes were committed when the buffer filled;
        # the last ten wait for the end of the attempt
        assert durable.count("StateSet") == MAX_BUFFERED_EVENTS
        release.set()
        await handle.result(timeout=DEADLINE)
    assert (await types_of(engine, handle.execution_id)).count("StateSet") == count


async def test_a_buffer_too_large_for_one_commit_is_split_into_commits_that_fit(
    tmp_path: Path,
) -> None:
    backend = SQLiteBackend(str(tmp_path / "steps.db"))
    backend.max_commit_bytes = 16 * 1024  # a backend whose largest commit is 16 KiB
    # (a payload limit the backend can store: the default 256 KiB is refused at start)
    engine = ss.Engine(backend=backend, poll_interval=0.01, max_payload_bytes=8 * 1024)

    @engine.step("b.big")
    async def big(ctx: ss.StepContext) -> int:
        for i in range(40):
            await ctx.set_state(f"k{i}", "x" * 1000)
        return 40

    async with engine:
        before = backend.commits_written
        handle = await engine.start("b.big")
        assert await handle.result(timeout=DEADLINE) == 40
        commits = backend.commits_written - before
    state = await engine.state_of(handle.execution_id)
    assert len(state) == 40
    # 40 KB of state and the completion do not fit one 16 KiB commit: at least three commits
    # after the start's, each atomic and in order
    assert commits >= 1 + 3
    await engine.aclose()


async def test_a_handler_recording_only_buffered_operations_still_yields_to_the_loop() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    ticks = [0]
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks[0] += 1
            await anyio.lowlevel.checkpoint()

    @engine.step("b.loop")
    async def loop(ctx: ss.StepContext) -> int:
        before = ticks[0]
        for i in range(5_000):  # no boundary: every one of these is buffered
            await ctx.set_state("i", i)
        return ticks[0] - before

    async with engine, anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        handle = await engine.start("b.loop")
        ticked = await handle.result(timeout=DEADLINE)
        done.set()
    assert isinstance(ticked, int)
    assert ticked > 0  # other tasks (lease renewals, other executions) ran meanwhile


async def test_an_actor_whose_lease_lapsed_runs_no_side_effect_and_another_run_does() -> None:
    clock = SkippingClock(auto=False)
    engine = ss.Engine("memory://", poll_interval=0.01, lease_seconds=30, clock=clock)
    bodies: list[str] = []
    skipped = [False]

    @engine.step("b.zombie")
    async def zombie(ctx: ss.StepContext) -> str:
        await ctx.set_state("before", 1)
        if not skipped[0]:
            skipped[0] = True
            clock.skip(31)  # the loop stalled longer than the lease: no renewal got through
        await ctx.do("charge", lambda: bodies.append("charge"))
        return "done"

    async with engine:
        handle = await engine.start("b.zombie")
        assert await handle.result(timeout=DEADLINE) == "done"
    assert bodies == ["charge"]  # the lapsed run stopped before the body
    types = await types_of(engine, handle.execution_id)
    assert types.count("StepLeased") == 2  # leased again once the lapsed lease expired
    assert await engine.state_of(handle.execution_id) == {"before": 1}


@pytest.mark.parametrize("durability", ["boundary", "each"])
async def test_durability_is_chosen_per_engine_and_per_step(
    durability: Any, tmp_path: Path
) -> None:
    backend = SQLiteBackend(str(tmp_path / "steps.db"))
    engine = ss.Engine(backend=backend, poll_interval=0.01, durability=durability)
    other: Durability = "each" if durability == "boundary" else "boundary"

    async def three(ctx: ss.StepContext) -> None:
        for key in "abc":
            await ctx.set_state(key, 1)

    engine.step("b.engine")(three)
    engine.step("b.step", durability=other)(three)
    commits: dict[str, int] = {}
    async with engine:
        for step_id, mode in (("b.engine", durability), ("b.step", other)):
            before = backend.commits_written
            handle = await engine.start(step_id)
            await handle.result(timeout=DEADLINE)
            commits[mode] = backend.commits_written - before
            assert await engine.state_of(handle.execution_id) == {"a": 1, "b": 1, "c": 1}
    # the start (scheduled, leased, started in one local commit), then: one commit for the
    # three writes and the completion, or one per write and one for the completion
    assert commits == {"boundary": 2, "each": 5}
    assert engine.durability == durability
    await engine.aclose()


def test_an_unknown_durability_is_refused() -> None:
    with pytest.raises(ss.StepsourceError, match="durability must be one of"):
        ss.Engine("memory://", durability="sometimes")  # type: ignore[arg-type]
    engine = ss.Engine("memory://")
    with pytest.raises(ss.StepsourceError, match="durability must be one of"):

        @engine.step("b.bad", durability="never")  # type: ignore[arg-type]
        async def bad(ctx: ss.StepContext) -> None:
            return None
