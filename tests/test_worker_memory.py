"""An idle worker gives the memory of a burst back to the OS (glibc's malloc_trim).

Resident sizes are measured in bench/ (workload f), not here: these tests pin when the pool
trims and that the trim works on this platform.
"""

from __future__ import annotations

import sys

import pytest

import stepsource as ss
from stepsource.engine import trim, worker

pytestmark = pytest.mark.anyio


def test_the_c_library_can_return_free_memory_on_linux() -> None:
    if sys.platform == "linux":  # glibc on every machine this suite runs on
        assert trim.release_free_memory() is True


async def test_the_pool_trims_once_a_burst_has_ended(
    backend_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def release() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(worker, "TRIM_AFTER", 5)
    monkeypatch.setattr(worker, "release_free_memory", release)
    engine = ss.Engine(backend_url, workers=8, poll_interval=0.01)

    @engine.step("mem.echo")
    async def echo(ctx: ss.StepContext, value: int) -> int:
        await ctx.set_state("v", value)
        return value

    async with engine:
        handles = [await engine.start("mem.echo", {"value": i}) for i in range(4)]
        assert [await h.result(timeout=30) for h in handles] == list(range(4))
        assert calls == [], "fewer actors than TRIM_AFTER ended: no trim yet"
        handles = [await engine.start("mem.echo", {"value": i}) for i in range(4)]
        assert [await h.result(timeout=30) for h in handles] == list(range(4))
    assert calls == [1], "the pool went idle after 8 ended actors: one trim"
