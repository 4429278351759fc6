"""An idle worker gives the memory of a burst back to the OS (glibc's malloc_trim).

Resident sizes are measured in bench/ (workload f), not here: these tests pin when the pool
trims and that the trim works on this platform.
"""

from __future__ import annotations

import sys

import anyio
import pytest

import stepsource as ss
from stepsource.engine import trim, worker

pytestmark = pytest.mark.anyio


def test_the_c_library_can_return_free_memory_on_linux() -> None:
    if sys.platform == "linux":  # glibc on every machine this suite runs on
        assert trim.release_free_memory() is True


async def test_the_pool_trims_once_idle_after_a_burst_and_never_mid_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the pool's own logic, the same on every backend: the in-memory one suffices
    calls: list[int] = []

    def release() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(worker, "TRIM_AFTER", 5)
    monkeypatch.setattr(worker, "release_free_memory", release)
    # a poll interval longer than any gap between two executions started back to back
    engine = ss.Engine("memory://", workers=8, poll_interval=1.0)

    @engine.step("mem.echo")
    async def echo(ctx: ss.StepContext, value: int) -> int:
        await ctx.set_state("v", value)
        return value

    async with engine:
        handles = [await engine.start("mem.echo", {"value": i}) for i in range(4)]
        assert [await h.result(timeout=30) for h in handles] == list(range(4))
        # one execution after another: the pool is empty between them, yet busy
        for i in range(8):
            assert await (await engine.start("mem.echo", {"value": i})).result(timeout=30) == i
        assert calls == [], "a steady stream of executions is never paused by a trim"
        with anyio.fail_after(30):
            while not calls:  # idle for a whole poll interval after 12 ended actors
                await anyio.sleep(0.05)
        await anyio.sleep(1.5)  # another poll interval: nothing more ended, no second trim
    assert calls == [1]
