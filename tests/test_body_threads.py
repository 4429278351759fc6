"""The threads sync ``ctx.do`` bodies run in: the handler's context, a bound on how many run at
once, errors and cancellation as the handler expects, and threads that end when idle."""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import stepsource as ss
from stepsource.engine import bodies
from stepsource.engine.affinity import current_cpu
from stepsource.engine.bodies import BodyThreads

pytestmark = pytest.mark.anyio

REQUEST = contextvars.ContextVar("REQUEST", default="none")


async def test_a_sync_body_sees_the_handlers_context_and_runs_off_the_loop(
    tmp_path: Path, anyio_backend: str
) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=1)
    loop_thread = threading.get_ident()

    def body() -> dict[str, object]:
        return {"request": REQUEST.get(), "off_loop": threading.get_ident() != loop_thread}

    @engine.step("ctx")
    async def handler(ctx: ss.StepContext) -> object:
        REQUEST.set("r-42")
        return await ctx.do("body", body)

    async with engine:
        result = await (await engine.start("ctx")).result()
    assert result == {"request": "r-42", "off_loop": True}


async def test_no_more_bodies_run_at_once_than_the_pool_has_threads(anyio_backend: str) -> None:
    pool = BodyThreads(size=2)
    running, peak = 0, 0
    lock = threading.Lock()

    def body(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return n

    results: list[int] = []

    async def one(n: int) -> None:
        results.append(await pool.run(lambda: body(n)))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(one, n)
    assert sorted(results) == list(range(6))
    assert peak == 2
    assert pool.threads == 2


async def test_a_body_waited_for_in_place_runs_on_the_loops_core_and_the_next_on_any(
    anyio_backend: str,
) -> None:
    # waking a thread on another core costs an inter-processor interrupt (tens of us in a
    # virtual machine): a body the loop's thread waits for in place runs on that thread's
    # core; a body awaited on the loop (other work may run meanwhile) may run on any
    pool = BodyThreads(size=1)
    allowed = os.sched_getaffinity(0)
    in_place = await pool.run(lambda: os.sched_getaffinity(0), alone=True)
    awaited = await pool.run(lambda: os.sched_getaffinity(0), alone=False)
    if current_cpu() is None:  # a C library without sched_getcpu: nothing is pinned
        assert in_place == allowed
    else:
        assert len(in_place) == 1
        assert in_place <= allowed
    assert awaited == allowed
    assert pool.threads == 1  # the same thread, pinned and then let go


async def test_a_body_error_reaches_the_caller_with_its_type(anyio_backend: str) -> None:
    pool = BodyThreads()

    def body() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        await pool.run(body)


async def test_a_cancelled_caller_waits_for_its_body_and_nothing_after_it_runs(
    anyio_backend: str,
) -> None:
    pool = BodyThreads()
    finished = threading.Event()
    after: list[str] = []

    def body() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    async def caller() -> None:
        await pool.run(body)
        await (
            anyio.lowlevel.checkpoint()
        )  # the first checkpoint after the body delivers the cancellation
        after.append("ran on")

    with anyio.move_on_after(0.05) as scope:
        await caller()
    assert scope.cancelled_caught
    assert finished.is_set()  # the wait outlived the deadline until the body returned
    assert after == []


async def test_idle_threads_end_and_the_next_body_starts_one(anyio_backend: str) -> None:
    pool = BodyThreads(idle_seconds=0.05)
    assert await pool.run(lambda: 1) == 1
    assert pool.threads == 1
    with anyio.fail_after(5):
        while alive(pool):
            await anyio.sleep(0.01)
    assert await pool.run(lambda: 2) == 2
    assert alive(pool) == 1


def alive(pool: BodyThreads) -> int:
    return pool.threads


# -- waiting in place: a body of the only execution running is taken without a loop wake-up --
def loop_frame(loop_thread: int) -> str:
    """The function the event loop's thread is executing now (its innermost Python frame)."""
    frame = sys._current_frames()[loop_thread]
    return frame.f_code.co_name


async def test_the_only_execution_running_waits_for_its_body_in_place(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodies, "INLINE_WAIT_SECONDS", 5.0)  # in place for the whole body
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=4)
    loop_thread = threading.get_ident()

    def body() -> str:
        time.sleep(0.05)
        return loop_frame(loop_thread)

    @engine.step("alone")
    async def handler(ctx: ss.StepContext) -> object:
        return [await ctx.do("body", body), await ctx.do("again", body)]

    async with engine:
        result = await (await engine.start("alone")).result(timeout=30)
    # the loop's thread sat in the hand-off's wait, not in the event loop's poll
    assert result == ["outcome", "outcome"]


async def test_with_another_execution_running_a_body_is_awaited_on_the_loop(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodies, "INLINE_WAIT_SECONDS", 5.0)  # would stall the other one
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=4)
    loop_thread = threading.get_ident()
    both_running, body_done = anyio.Event(), anyio.Event()
    arrived = 0

    def body() -> str:
        time.sleep(0.05)
        return loop_frame(loop_thread)

    @engine.step("pair")
    async def handler(ctx: ss.StepContext, role: str) -> object:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both_running.set()
        await both_running.wait()
        if role == "waits":
            await body_done.wait()  # holds its lease until the other's body is done
            return None
        frame = await ctx.do("body", body)
        body_done.set()
        return frame

    async with engine:
        runs = [await engine.start("pair", {"role": r}) for r in ("waits", "works")]
        frame = await runs[1].result(timeout=30)
        await runs[0].result(timeout=30)
    assert frame != "outcome"  # the loop was free for the other execution meanwhile


async def test_a_long_body_run_alone_stalls_the_loop_only_briefly(
    tmp_path: Path, anyio_backend: str
) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=1)
    loop_thread = threading.get_ident()

    def body() -> str:
        time.sleep(0.2)  # far longer than the wait in place
        return loop_frame(loop_thread)

    @engine.step("long")
    async def handler(ctx: ss.StepContext) -> object:
        return await ctx.do("body", body)

    async with engine:
        frame = await (await engine.start("long")).result(timeout=30)
    assert frame != "outcome"  # the loop went back to its work after the short wait
