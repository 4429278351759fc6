"""The worker process of workload (f): it runs N executions into ``wait_for_event``.

Started by :mod:`bench.workloads.suspended` as ``python -m bench.workloads.suspended_worker
DB N``. It opens an engine with 200 workers on the SQLite file, starts N executions of a step
that waits for an event that never comes, waits until every one has suspended (the handler
was entered N times and no actor is live), collects garbage and prints ``READY {json}``.
Its parent then reads this process's RSS with psutil and closes our stdin; we leave the
engine's block and exit.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc
from typing import Any

import anyio
import psutil

import stepsource as ss


def allocation_sites(top: int = 12) -> dict[str, Any]:
    """The Python heap right now, by allocating line (tracemalloc was started at launch)."""
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("lineno")
    total = sum(stat.size for stat in stats)
    rows = [
        [
            f"{stat.traceback[0].filename.split('site-packages/')[-1]}:{stat.traceback[0].lineno}",
            round(stat.size / 2**20, 2),
            stat.count,
        ]
        for stat in stats[:top]
    ]
    return {"python_heap_mb": round(total / 2**20, 2), "sites": rows}


async def run(path: str, count: int, trace: bool) -> None:
    engine = ss.Engine(f"sqlite:///{path}", workers=200, poll_interval=0.05)
    entered = 0

    @engine.step("bench.wait")
    async def waiter(ctx: ss.StepContext) -> None:
        nonlocal entered
        entered += 1
        await ctx.wait_for_event("never")

    me = psutil.Process()
    async with engine:
        gc.collect()
        baseline = me.memory_info().rss
        started = time.perf_counter()
        remaining = count

        async def starter() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await engine.start("bench.wait")

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(starter)
        # no event says "all suspended": poll the handler count and the live actors
        while entered < count or engine.live_executions():  # noqa: ASYNC110
            await anyio.sleep(0.05)
        seconds = time.perf_counter() - started
        await anyio.sleep(1.0)  # the read-model runner and the lease loop settle
        gc.collect()
        report: dict[str, Any] = {"baseline_rss": baseline, "seconds": seconds, "pid": me.pid}
        if trace:
            report["tracemalloc"] = allocation_sites()
        sys.stdout.write("READY " + json.dumps(report) + "\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin


if __name__ == "__main__":
    tracing = sys.argv[3:] == ["trace"]
    if tracing:
        tracemalloc.start()
    anyio.run(run, sys.argv[1], int(sys.argv[2]), tracing)
