"""Plain ``def`` handlers run in a worker thread with the same context operations: recorded,
replayed and committed as an ``async def`` handler's are, and the event loop stays free."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.testing import crash_everywhere

pytestmark = pytest.mark.anyio

DEADLINE = 30


def register(engine: ss.Engine, seen: dict[str, Any]) -> None:
    @engine.step("sync.batch")
    def batch(ctx: Any, items: list[int]) -> dict[str, Any]:
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        total = ctx.get_state("total", 0)
        for item in items:
            total += ctx.do(f"square-{item}", lambda item=item: item * item)
            ctx.set_state("total", total)
        checkpoint = ctx.create_checkpoint({"done": len(items)}, cursor=len(items))
        ctx.add_history_entry("custom", {"total": total})
        token = str(ctx.uuid4())
        return {
            "total": total,
            "checkpoint": checkpoint,
            "token": token,
            "n": ctx.info.attempt_number,
        }


async def test_a_plain_def_handler_runs_in_a_thread_with_the_context_operations() -> None:
    seen: dict[str, Any] = {}
    engine = ss.Engine("memory://", poll_interval=0.01)
    register(engine, seen)
    async with engine:
        handle = await engine.start("sync.batch", {"items": [1, 2, 3]})
        output = await handle.result(timeout=DEADLINE)
    assert isinstance(output, dict)
    assert output["total"] == 14
    assert output["n"] == 1
    assert seen["thread"] is True
    assert await engine.state_of(handle.execution_id) == {"total": 14}
    [checkpoint] = await engine.checkpoints_of(handle.execution_id)
    assert checkpoint.id == output["checkpoint"]
    assert checkpoint.cursor == 3
    history = [h.type for h in await engine.history_of(handle.execution_id)]
    assert history == [
        "started",
        "state-set",
        "state-set",
        "state-set",
        "checkpoint",
        "custom",
        "completed",
    ]


async def test_a_plain_def_handler_survives_a_crash_at_every_commit_and_operation() -> None:
    engine = ss.Engine("memory://")
    register(engine, {})
    report = await crash_everywhere(engine, "sync.batch", {"items": [1, 2]})
    assert report.operations_tried == report.operations > 5
    for durability in ("each",):
        again = await crash_everywhere(
            engine, "sync.batch", {"items": [1, 2]}, durability=durability
        )
        assert again.boundaries_tried == again.commits - 1


async def test_a_blocking_plain_def_handler_leaves_the_event_loop_free() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    release = threading.Event()

    @engine.step("sync.blocking")
    def blocking(ctx: Any) -> str:
        ctx.set_state("phase", "blocking")
        release.wait(timeout=DEADLINE)  # a blocking call: in a thread, the loop goes on
        return "done"

    @engine.step("sync.other")
    async def other(ctx: ss.StepContext) -> str:
        return "other"

    async with engine:
        slow = await engine.start("sync.blocking")
        began = time.monotonic()
        # another execution runs to its end while the first one blocks its thread
        assert await (await engine.start("sync.other")).result(timeout=DEADLINE) == "other"
        assert time.monotonic() - began < DEADLINE
        release.set()
        assert await slow.result(timeout=DEADLINE) == "done"


async def test_a_plain_def_handler_waits_and_is_woken_by_an_event() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("sync.wait")
    def waiting(ctx: Any) -> Any:
        ctx.set_state("phase", "waiting")
        value = ctx.wait_for_event("go", timeout=60)
        ctx.set_state("phase", "woken")
        return value

    async with engine:
        handle = await engine.start("sync.wait")
        with anyio.fail_after(DEADLINE):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        assert engine.live_executions() == []  # suspended: no thread, no task held
        await handle.send_event("go", {"ok": True})
        assert await handle.result(timeout=DEADLINE) == {"ok": True}
    assert await engine.state_of(handle.execution_id) == {"phase": "woken"}


async def test_a_plain_def_handler_runs_a_saga_with_with() -> None:
    """``ctx.saga`` gave a plain handler the async Saga (its steps coroutines never awaited);
    it is a SyncSaga: steps without await, compensation on leaving ``with`` by an error."""
    engine = ss.Engine("memory://", poll_interval=0.01)
    log: list[str] = []

    def reserve() -> str:
        log.append("reserve")
        return "r-1"

    @engine.step("sync.saga")
    def order(ctx: Any) -> dict[str, Any]:
        saga = ctx.saga("order")
        try:
            with saga:
                saga.step("reserve", reserve, compensate=log.append)
                saga.step("charge", lambda: 1 / 0)
        except ss.SubStepFailedError as error:
            return {"compensated": saga.compensated, "error": error.error_type}
        return {}

    async with engine:
        handle = await engine.start("sync.saga")
        assert await handle.result(timeout=DEADLINE) == {
            "compensated": ["reserve"],
            "error": "ZeroDivisionError",
        }
    assert log == ["reserve", "r-1"]


async def test_a_plain_def_handler_s_mistakes_are_refused_with_the_fix() -> None:
    """The context called from a thread the handler started failed with anyio's
    NoEventLoopError; a handler returning a coroutine failed on its output (and Python warned
    that it was never awaited)."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("sync.thread")
    def from_thread(ctx: Any) -> str:
        found: list[str] = []

        def other() -> None:
            try:
                ctx.set_state("k", 1)
            except ss.UsageError as error:
                found.append(error.reason)

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        return found[0]

    async def later() -> int:
        return 1

    @engine.step("sync.coroutine")
    def returns_coroutine(ctx: Any) -> Any:
        return later()

    async with engine:
        thread = await engine.start("sync.thread")
        assert await thread.result(timeout=DEADLINE) == (
            "a plain def handler's context was called from another thread than the handler's "
            "(a thread it started, or a ctx.do body)"
        )
        assert await engine.state_of(thread.execution_id) == {}  # nothing recorded
        coroutine = await engine.start("sync.coroutine")
        with pytest.raises(ss.StepFailedError, match="UsageError: the plain def handler returned"):
            await coroutine.result(timeout=DEADLINE)
