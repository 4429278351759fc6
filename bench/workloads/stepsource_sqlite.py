"""stepsource on SQLite (WAL, synchronous=FULL, the defaults): workloads (a) to (e) and (r).

``params["job"]`` picks the job:

- ``appends``: (a) sequential awaited ``set_state`` in one execution, with
  ``durability="boundary"`` (the default: buffered, durable at ``result()``) and ``"each"``
  (one commit per operation), and sequential no-op ``ctx.do`` (one commit each); (b) 200
  executions x 50 ``set_state`` at once, in both modes.
- ``e2e``: (c) an empty step, ``start`` -> ``result()``, one at a time and 50 at a time;
  (r) a batch handler (25 items: a checkpoint per 10, a state write and a ``ctx.do`` per
  item), the same ways.
- ``replay``: (d) ``state_of`` of an execution of N events, without and with snapshots.
- ``rebuild``: (e) ``rebuild_projections`` of a log of about N events.

Workers run in this process (``async with engine``). Every timed span ends when the last
``result()`` returns, so the commit that makes the work durable is inside the clock; each
workload also reports the commits it made per operation or execution
(``SQLiteBackend.commits_written``), from which the harness computes its floor.
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


# -- (a) sequential operations -----------------------------------------------------------------
def _commits(engine: ss.Engine) -> int:
    """Append transactions the engine's SQLite backend has committed so far."""
    return int(engine.store.backend.commits_written)  # type: ignore[attr-defined]


async def seq_ops(
    path: Path, n: int, durability: str, op: str, recorder: Recorder | None = None
) -> tuple[float, float]:
    """Operations per second of one handler awaiting ``n`` operations one after another
    (``op``: ``set_state`` or ``do``, a no-op ``ctx.do``), timed from the loop's start to
    ``result()`` (so the commit that makes the last one durable is inside the clock), and
    the commits per operation in that span."""
    remove_db(path)
    engine = ss.Engine(_url(path), workers=1, durability=durability)  # type: ignore[arg-type]
    started, before = 0.0, 0

    @engine.step("bench.a")
    async def handler(ctx: ss.StepContext, n: int) -> None:
        nonlocal started, before
        await ctx.set_state("k", -1)
        await ctx.flush()  # the attempt's first commit is behind the clock
        before, started = _commits(engine), time.perf_counter()
        for i in range(n):
            if op == "do":
                await ctx.do(f"op-{i}", lambda i=i: i)  # type: ignore[misc]
            else:
                await ctx.set_state("k", i)

    async with engine:
        await (await engine.start("bench.a", {"n": n})).result()
        ended = time.perf_counter()
        commits = _commits(engine) - before
        if recorder is not None:
            recorder.durability["stepsource (SQLite)"] = await _settings(engine)
    return n / (ended - started), commits / n


# -- (b) concurrent appends (group commit) ---------------------------------------------------
async def concurrent_appends(
    path: Path, executions: int, per: int, durability: str
) -> tuple[float, float]:
    """Events per second of ``executions`` handlers each awaiting ``per`` set_state at once,
    timed from their common start to the last ``result()``, and the mean number of events
    per transaction."""
    remove_db(path)
    engine = ss.Engine(_url(path), workers=executions, durability=durability)  # type: ignore[arg-type]
    ready = anyio.Event()
    arrived = 0

    @engine.step("bench.b")
    async def handler(ctx: ss.StepContext, per: int) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == executions:
            ready.set()
        await ready.wait()  # every handler is running before the clock starts
        for i in range(per):
            await ctx.set_state("k", i)

    async with engine:
        handles = [await engine.start("bench.b", {"per": per}) for _ in range(executions)]
        await ready.wait()
        started = time.perf_counter()
        before = _commits(engine)
        for handle in handles:
            await handle.result()
        seconds = time.perf_counter() - started
        commits = _commits(engine) - before
    total = executions * per
    return total / seconds, total / max(commits, 1)


# -- (c) end to end, and (r) a batch handler -------------------------------------------------------
def register_batch(engine: ss.Engine) -> None:
    """A batch handler over ``items`` items: a checkpoint every 10 items, and per item a
    state write and a no-op ``ctx.do`` (the commit that makes the item durable)."""

    @engine.step("bench.batch")
    async def batch(ctx: ss.StepContext, items: int) -> int:
        for i in range(items):
            if i % 10 == 0:
                await ctx.create_checkpoint(cursor=i, items_processed=i)
            await ctx.set_state("last", i)
            await ctx.do(f"item-{i}", lambda i=i: i)  # type: ignore[misc]
        return items


def observers() -> list[ss.Interceptor]:
    """Tracing (an SDK tracer provider whose batch processor hands spans to an exporter that
    drops them) and Prometheus metrics (a registry of their own): what a traced and measured
    production worker pays, short of the network."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from prometheus_client import CollectorRegistry

    from stepsource.metrics import MetricsInterceptor
    from stepsource.otel import TracingInterceptor

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    return [TracingInterceptor(provider), MetricsInterceptor(CollectorRegistry())]


async def e2e(
    path: Path,
    count: int,
    concurrency: int,
    workers: int,
    step: str = "bench.empty",
    observed: bool = False,
    url: str | None = None,
) -> tuple[float, float]:
    """Executions per second from ``engine.start`` to ``result()``, ``concurrency`` at a
    time, and the commits per execution in that span. ``step``: ``bench.empty`` (an empty
    step) or ``bench.batch`` (:func:`register_batch`, 25 items); ``observed``: with tracing
    and metrics (:func:`observers`); ``url``: another backend than the SQLite file ``path``."""
    remove_db(path)
    engine = ss.Engine(
        url or _url(path), workers=workers, interceptors=observers() if observed else ()
    )

    @engine.step("bench.empty")
    async def handler(ctx: ss.StepContext) -> None:
        return None

    register_batch(engine)
    args = {"items": 25} if step == "bench.batch" else None

    async def one() -> None:
        await (await engine.start(step, args)).result()

    async with engine:
        await one()  # warm-up: opens the backend, publishes, first lease
        limiter = anyio.CapacityLimiter(concurrency)

        async def limited() -> None:
            async with limiter:
                await one()

        before = _commits(engine)
        with Timer() as timer:
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(limited)
        commits = _commits(engine) - before
    await engine.aclose()
    return count / timer.seconds, commits / count


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


async def replay(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
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


async def rebuild(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    path = tmp / "rebuild.db"
    remove_db(path)
    with Timer() as setup:
        await build_log(path, int(params["events"]))
    recorder.notes["ss_rebuild_setup_seconds"] = f"{setup.seconds:.1f}"

    async def once() -> tuple[float, int, int, int]:
        engine = ss.Engine(_url(path), workers=0)
        try:
            with Timer() as timer:
                report = await engine.rebuild_projections()
        finally:
            await engine.aclose()
        return timer.seconds, report.events, report.executions, report.helpers

    for _ in range(int(params["runs"])):
        seconds, events, executions, helpers = await once()
        recorder.add(
            "ss_rebuild",
            events / seconds,
            "events/s",
            events=events,
            executions=executions,
            helper_processes=helpers,
        )
    if "ss_rebuild" in profile:
        with profiled(recorder, "ss_rebuild"):
            await once()
    remove_db(path)


# -- jobs --------------------------------------------------------------------------------------
SEQUENTIAL = {  # metric -> (durability, operation)
    "ss_seq_set_state_boundary": ("boundary", "set_state"),
    "ss_seq_set_state_each": ("each", "set_state"),
    "ss_seq_do": ("boundary", "do"),
}
CONCURRENT = {"ss_concurrent_boundary": "boundary", "ss_concurrent_each": "each"}


async def appends(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    path = tmp / "appends.db"
    n, runs = int(params["seq_n"]), int(params["runs"])
    for metric, (durability, op) in SEQUENTIAL.items():
        unit = "ctx.do/s" if op == "do" else "set_state/s"
        for run in range(runs):
            rate, per_op = await seq_ops(path, n, durability, op, recorder if run == 0 else None)
            recorder.add(metric, rate, unit, n=n, durability=durability)
            recorder.add(f"{metric}_commits", per_op, "commits/op", n=n)
    executions, per = int(params["executions"]), int(params["per"])
    for metric, durability in CONCURRENT.items():
        for _ in range(runs):
            rate, batch = await concurrent_appends(path, executions, per, durability)
            recorder.add(
                metric,
                rate,
                "events/s",
                executions=executions,
                per_execution=per,
                durability=durability,
            )
            recorder.add(f"{metric}_events_per_commit", batch, "events/commit")
    for metric, (durability, op) in SEQUENTIAL.items():
        if metric in profile:
            with profiled(recorder, metric):
                await seq_ops(path, n, durability, op)
    for metric, durability in CONCURRENT.items():
        if metric in profile:
            with profiled(recorder, metric):
                await concurrent_appends(path, executions, per, durability)
    remove_db(path)


END_TO_END = {  # metric -> (step, count parameter, concurrency, workers, observed)
    "ss_e2e_seq": ("bench.empty", "seq_count", 1, 8, False),
    "ss_e2e_conc50": ("bench.empty", "conc_count", 50, 64, False),
    "ss_batch_seq": ("bench.batch", "batch_seq_count", 1, 8, False),
    # the same with tracing and metrics on: what observing costs (target o1)
    "ss_batch_seq_observed": ("bench.batch", "batch_seq_count", 1, 8, True),
    "ss_batch_conc50": ("bench.batch", "batch_conc_count", 50, 64, False),
}
#: metrics measured against another stepsource metric rather than a peer (o1: observed over
#: plain): their runs alternate with the other's, A B B A..., so that both sides of the
#: ratio see the same spell of the shared machine
PAIRED = {"ss_batch_seq_observed": "ss_batch_seq"}


def run_order(runs: int) -> list[str]:
    """The e2e runs in order: each metric ``runs`` times in turn, a paired metric's runs
    alternating with its partner's (A B B A A B ...) in the partner's turn."""
    order: list[str] = []
    partner_of = {base: paired for paired, base in PAIRED.items()}
    for metric in END_TO_END:
        if metric in PAIRED:
            continue  # runs in its partner's turn
        paired = partner_of.get(metric)
        if paired is None:
            order += [metric] * runs
            continue
        for i in range(runs):
            order += [metric, paired] if i % 2 == 0 else [paired, metric]
    return order


async def end_to_end(
    recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]
) -> None:
    path = tmp / "e2e.db"
    for metric in run_order(int(params["runs"])):
        step, size, concurrency, workers, observed = END_TO_END[metric]
        count = int(params[size])
        rate, commits = await e2e(path, count, concurrency, workers, step, observed)
        recorder.add(
            metric,
            rate,
            "executions/s",
            count=count,
            concurrency=concurrency,
            workers=workers,
        )
        recorder.add(f"{metric}_commits", commits, "commits/execution")
    for metric, (step, size, concurrency, workers, observed) in END_TO_END.items():
        if metric in profile:
            with profiled(recorder, metric):
                await e2e(path, int(params[size]), concurrency, workers, step, observed)
    remove_db(path)


JOBS = {"appends": appends, "e2e": end_to_end, "replay": replay, "rebuild": rebuild}


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(JOBS[params["job"]], recorder, params, tmp, profile)


if __name__ == "__main__":
    main(measure)
