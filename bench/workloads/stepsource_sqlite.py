"""stepsource on SQLite (WAL, synchronous=FULL, the defaults): workloads (a) to (e).

``params["job"]`` picks the job:

- ``appends``: (a) sequential awaited ``set_state`` in one execution; (b) 200 concurrent
  executions appending (group commit).
- ``e2e``: (c) an empty step, ``start`` -> ``result()``, sequential and 50 concurrent.
- ``replay``: (d) ``state_of`` of an execution of N events, without and with snapshots.
- ``rebuild``: (e) ``rebuild_projections`` of a log of about N events.

Workers run in this process (``async with engine``); every awaited operation is durable
when it returns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

import stepsource as ss
from bench.common import Recorder, Timer, main, profiled, remove_db


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


async def _settings(engine: ss.Engine) -> dict[str, Any]:
    backend = engine.store.backend
    getter = getattr(backend, "connection_settings", None)
    return dict(await getter()) if getter is not None else {}


# -- (a) sequential appends ------------------------------------------------------------------
async def seq_set_state(path: Path, n: int, recorder: Recorder | None = None) -> float:
    """set_state per second, timed inside the handler (first to last awaited write)."""
    remove_db(path)
    engine = ss.Engine(_url(path), workers=1)

    @engine.step("bench.a")
    async def handler(ctx: ss.StepContext, n: int) -> float:
        await ctx.set_state("k", -1)  # the first commit of the attempt opens everything
        started = time.perf_counter()
        for i in range(n):
            await ctx.set_state("k", i)
        return time.perf_counter() - started

    async with engine:
        seconds = await (await engine.start("bench.a", {"n": n})).result()
        if recorder is not None:
            recorder.durability["stepsource (SQLite)"] = await _settings(engine)
    assert isinstance(seconds, float)
    return n / seconds


# -- (b) concurrent appends (group commit) ---------------------------------------------------
async def concurrent_appends(path: Path, executions: int, per: int) -> tuple[float, float]:
    """Events per second of ``executions`` handlers each awaiting ``per`` set_state at once,
    and the mean number of events per transaction."""
    remove_db(path)
    engine = ss.Engine(_url(path), workers=executions)
    ready = anyio.Event()
    arrived = 0
    ends: list[float] = []

    @engine.step("bench.b")
    async def handler(ctx: ss.StepContext, per: int) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == executions:
            ready.set()
        await ready.wait()  # every handler is running before the clock starts
        for i in range(per):
            await ctx.set_state("k", i)
        ends.append(time.perf_counter())

    async with engine:
        handles = [await engine.start("bench.b", {"per": per}) for _ in range(executions)]
        await ready.wait()
        started = time.perf_counter()
        before = engine.store.backend.commits_written  # type: ignore[attr-defined]
        for handle in handles:
            await handle.result()
        commits = engine.store.backend.commits_written - before  # type: ignore[attr-defined]
    total = executions * per
    return total / (max(ends) - started), total / max(commits, 1)


# -- (c) end to end ----------------------------------------------------------------------------
async def e2e(path: Path, count: int, concurrency: int, workers: int) -> float:
    """Empty steps per second from ``engine.start`` to ``result()``."""
    remove_db(path)
    engine = ss.Engine(_url(path), workers=workers)

    @engine.step("bench.empty")
    async def handler(ctx: ss.StepContext) -> None:
        return None

    async def one() -> None:
        await (await engine.start("bench.empty")).result()

    async with engine:
        await one()  # warm-up: opens the backend, publishes, first lease
        limiter = anyio.CapacityLimiter(concurrency)

        async def limited() -> None:
            async with limiter:
                await one()

        with Timer() as timer:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(limited)
    return count / timer.seconds


# -- (d) replay --------------------------------------------------------------------------------
def register_builder(engine: ss.Engine) -> None:
    """A step that records ``commits`` commits of 10 events (1 StateSet + 9 history
    entries, the entries committed with the next awaited write); state stays 10 keys."""

    @engine.step("bench.build")
    async def build(ctx: ss.StepContext, commits: int) -> int:
        for i in range(commits):
            for j in range(9):
                ctx.add_history_entry("custom", {"i": i, "j": j, "note": "bench"})
            await ctx.set_state(f"k{i % 10}", {"i": i, "payload": "x" * 32})
        return commits


async def build_execution(path: Path, events: int, snapshot_every: int | None) -> str:
    engine = ss.Engine(_url(path), workers=1, snapshot_every=snapshot_every)
    register_builder(engine)
    async with engine:
        handle = await engine.start("bench.build", {"commits": max(events // 10, 1)})
        await handle.result()
    return handle.execution_id


async def time_state_of(path: Path, execution_id: str, snapshot_every: int | None) -> float:
    """Seconds of one ``state_of`` on a fresh client engine (after one untimed warm-up)."""
    engine = ss.Engine(_url(path), workers=0, snapshot_every=snapshot_every)
    try:
        await engine.state_of(execution_id)  # opens the connections
        with Timer() as timer:
            await engine.state_of(execution_id)
    finally:
        await engine.aclose()
    return timer.seconds


async def replay(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]):
    runs = int(params["runs"])
    for size in params["sizes"]:
        path = tmp / f"replay-{size}.db"
        remove_db(path)
        execution_id = await build_execution(path, size, snapshot_every=100)
        engine = ss.Engine(_url(path), workers=0)
        events = len(await engine.events(execution_id))
        await engine.aclose()
        full_runs = runs if size <= 10_000 else min(runs, 3)
        for _ in range(full_runs):
            seconds = await time_state_of(path, execution_id, None)
            recorder.add(f"ss_replay_full_{size}", events / seconds, "events/s", events=events)
        for _ in range(runs):
            seconds = await time_state_of(path, execution_id, 100)
            recorder.add(
                f"ss_replay_snapshot_{size}",
                seconds * 1000,
                "ms",
                events=events,
                snapshot_every=100,
            )
        if f"ss_replay_full_{size}" in profile:
            with profiled(recorder, f"ss_replay_full_{size}"):
                await time_state_of(path, execution_id, None)
        remove_db(path)


# -- (e) rebuild -------------------------------------------------------------------------------
async def build_log(path: Path, events: int, concurrency: int = 200) -> int:
    """A log of about ``events`` events: executions of 94 events each (scheduled, leased,
    started, 9 commits of 10 events, completed), ``concurrency`` at a time."""
    per_execution = 94
    count = max(events // per_execution, 1)
    engine = ss.Engine(_url(path), workers=concurrency)
    register_builder(engine)
    async with engine:
        queue = list(range(count))

        async def feeder() -> None:
            while queue:
                queue.pop()
                await (await engine.start("bench.build", {"commits": 9})).result()

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(feeder)
        total = await engine.store.backend.max_position()
    return int(total)


async def rebuild(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]):
    path = tmp / "rebuild.db"
    remove_db(path)
    with Timer() as setup:
        await build_log(path, int(params["events"]))
    recorder.notes["ss_rebuild_setup_seconds"] = f"{setup.seconds:.1f}"

    async def once() -> tuple[float, int, int]:
        engine = ss.Engine(_url(path), workers=0)
        try:
            with Timer() as timer:
                report = await engine.rebuild_projections()
        finally:
            await engine.aclose()
        return timer.seconds, report.events, report.executions

    for _ in range(int(params["runs"])):
        seconds, events, executions = await once()
        recorder.add(
            "ss_rebuild", events / seconds, "events/s", events=events, executions=executions
        )
    if "ss_rebuild" in profile:
        with profiled(recorder, "ss_rebuild"):
            await once()
    remove_db(path)


# -- jobs --------------------------------------------------------------------------------------
async def appends(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]):
    path = tmp / "appends.db"
    n = int(params["seq_n"])
    for run in range(int(params["runs"])):
        rate = await seq_set_state(path, n, recorder if run == 0 else None)
        recorder.add("ss_seq_set_state", rate, "set_state/s", n=n)
    executions, per = int(params["executions"]), int(params["per"])
    for _ in range(int(params["runs"])):
        rate, batch = await concurrent_appends(path, executions, per)
        recorder.add(
            "ss_concurrent_appends", rate, "events/s", executions=executions, per_execution=per
        )
        recorder.add("ss_concurrent_events_per_commit", batch, "events/commit")
    if "ss_seq_set_state" in profile:
        with profiled(recorder, "ss_seq_set_state"):
            await seq_set_state(path, n)
    if "ss_concurrent_appends" in profile:
        with profiled(recorder, "ss_concurrent_appends"):
            await concurrent_appends(path, executions, per)
    remove_db(path)


async def end_to_end(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]):
    path = tmp / "e2e.db"
    seq, conc = int(params["seq_count"]), int(params["conc_count"])
    for _ in range(int(params["runs"])):
        rate = await e2e(path, seq, 1, 8)
        recorder.add("ss_e2e_seq", rate, "executions/s", count=seq, workers=8)
    for _ in range(int(params["runs"])):
        rate = await e2e(path, conc, 50, 64)
        recorder.add("ss_e2e_conc50", rate, "executions/s", count=conc, concurrency=50, workers=64)
    if "ss_e2e_seq" in profile:
        with profiled(recorder, "ss_e2e_seq"):
            await e2e(path, seq, 1, 8)
    if "ss_e2e_conc50" in profile:
        with profiled(recorder, "ss_e2e_conc50"):
            await e2e(path, conc, 50, 64)
    remove_db(path)


JOBS = {"appends": appends, "e2e": end_to_end, "replay": replay, "rebuild": rebuild}


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(JOBS[params["job"]], recorder, params, tmp, profile)


if __name__ == "__main__":
    main(measure)
