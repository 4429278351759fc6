"""``ctx.patched(change_id)``: executions that passed a point before a code change keep the old
path on replay; new ones (and those that had not reached it) take the new path, for good."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio

DEADLINE = 30


def make(url: str, patched: bool, seen: list[str]) -> ss.Engine:
    """The same step before (patched=False) and after a deploy that changed what happens
    before the wait; both versions are "1": replay alone keeps old executions on their path."""
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("patch.order", max_retries=1, retry=ss.RetryPolicy(initial=0, backoff=1))
    async def order(
        ctx: ss.StepContext, before_wait: bool, fail_once: bool = False
    ) -> dict[str, Any]:
        waits = ctx.retry_count == 0  # a retry does not wait for the event a second time
        if not before_wait and waits:
            await ctx.wait_for_event("ready")
        if patched and await ctx.patched("send-receipt"):
            seen.append("new")
            await ctx.do("receipt", lambda: "sent")  # the new path records more
            path = "new"
        else:
            seen.append("old")
            path = "old"
        await ctx.set_state("path", path)
        if before_wait and waits:
            await ctx.wait_for_event("ready")
        if fail_once and ctx.retry_count == 0:
            raise RuntimeError("one retry, to see the path stay")
        return {"path": path}

    return engine


async def _park(url: str, before_wait: bool, fail_once: bool = False) -> str:
    old = make(url, patched=False, seen=[])
    async with old:
        data = {"before_wait": before_wait, "fail_once": fail_once}
        handle = await old.start("patch.order", data)
        with anyio.fail_after(DEADLINE):
            while (await old.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
    return handle.execution_id


async def test_an_execution_past_the_change_keeps_the_old_path(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    execution_id = await _park(url, before_wait=True)  # passed the change point, then waited
    seen: list[str] = []
    new = make(url, patched=True, seen=seen)
    async with new:
        handle = new.get_handle(execution_id)
        await handle.send_event("ready")
        assert await handle.result(timeout=DEADLINE) == {"path": "old"}
        assert await new.verify(execution_id) is None  # the record replays without divergence
    assert "new" not in seen
    types = [type(e).__name__ for e in await new.events(execution_id)]
    assert "PatchMarked" not in types


async def test_an_execution_before_the_change_and_a_new_one_take_the_new_path_for_good(
    tmp_path: Any,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    # waiting before it reached the change
    waiting = await _park(url, before_wait=False, fail_once=True)
    seen: list[str] = []
    new = make(url, patched=True, seen=seen)
    async with new:
        old_handle = new.get_handle(waiting)
        await old_handle.send_event("ready")
        fresh = await new.start("patch.order", {"before_wait": True, "fail_once": True})
        with anyio.fail_after(DEADLINE):
            while (await new.describe(fresh.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        await fresh.send_event("ready")
        assert await old_handle.result(timeout=DEADLINE) == {"path": "new"}
        assert await fresh.result(timeout=DEADLINE) == {"path": "new"}
        for execution_id in (waiting, fresh.execution_id):
            assert await new.verify(execution_id) is None
            types = [type(e).__name__ for e in await new.events(execution_id)]
            assert types.count("PatchMarked") == 1  # recorded once, True on the retry too
            assert types.count("AttemptFailed") == 1
            history = [h.type for h in await new.history_of(execution_id)]
            assert "patched" in history


@pytest.mark.parametrize("before", ["nothing", "a buffered write", "a ctx.do"])
@pytest.mark.parametrize("durability", ["boundary", "each"])
async def test_a_patch_check_resumed_after_a_crash_records_once_and_takes_the_new_path(
    before: str, durability: str
) -> None:
    """``ctx.patched`` as the first new operation of a resumed attempt: the crash left events
    of the attempt in the log (its start, a ctx.do result), so the mark goes after them. It
    used to be appended at the version the run had replayed to: a version conflict taken
    for a lost lease, five times, then the execution failed."""
    from stepsource.testing import crash_everywhere

    engine = ss.Engine("memory://", durability=durability)  # type: ignore[arg-type]

    @engine.step("patch.resumed")
    async def resumed(ctx: ss.StepContext) -> dict[str, Any]:
        if before == "a buffered write":
            await ctx.set_state("before", 1)
        elif before == "a ctx.do":
            await ctx.do("a", lambda: 1)
        if await ctx.patched("p1"):
            await ctx.set_state("new", True)
        return await ctx.get_state_object()

    report = await crash_everywhere(engine, "patch.resumed", {}, timeout=20)
    assert report.crashes > 0
    async with engine:
        handle = await engine.start("patch.resumed")
        assert await handle.result(timeout=10) == {
            "new": True,
            **({"before": 1} if before == "a buffered write" else {}),
        }
        types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert types.count("PatchMarked") == 1
