"""A worker whose renewals fail until its own lease lapses may lease the same execution
again while its first actor still runs (stuck in a body or a commit): the pool must never run
two actors of one execution at once. The first is stopped, and the second starts once it has
ended; the first one's end does not give back the lease the second now holds."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.errors import BackendUnavailableError

pytestmark = pytest.mark.anyio


class RenewalsFail(MemoryBackend):
    """A memory backend whose renewals fail while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        if self.failing:
            raise BackendUnavailableError("renewals fail (test)")
        return await super().renew(worker_id, stream_ids, now_ms, lease_ms)


async def test_a_lease_taken_again_never_runs_two_actors_at_once(anyio_backend: str) -> None:
    backend = RenewalsFail()
    engine = ss.Engine(backend=backend, lease_seconds=0.3, poll_interval=0.01)
    running = 0
    most = 0
    runs = 0
    entered = anyio.Event()

    async def body() -> int:
        nonlocal running, most, runs
        running += 1
        runs += 1
        most = max(most, running)
        entered.set()
        try:
            await anyio.sleep(0.6 if runs == 1 else 0)  # the first outlives its lease
        finally:
            running -= 1
        return runs

    @engine.step("relapse.job")
    async def job(ctx: ss.StepContext) -> int:
        return int(await ctx.do("slow", body))

    async with engine:
        handle = await engine.start("relapse.job")
        await entered.wait()
        backend.failing = True  # the lease lapses unseen; the pool leases it again
        await anyio.sleep(0.45)
        backend.failing = False
        result = await handle.result(timeout=20)
    await engine.aclose()
    assert most == 1, f"{most} bodies of one execution ran at once in one worker"
    assert isinstance(result, int)
    assert result >= 1
