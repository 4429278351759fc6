"""Interceptors wrap starts, attempts, ctx.do bodies, waits and messages; tracing and metrics
are built on them.

In this process: what each interceptor sees, in which order, and what replay hides from it;
the spans of the OpenTelemetry interceptor (SDK in-memory exporter). Across processes (test
process starting, worker processes running, one SIGKILLed): one trace, a re-run body marked
as such, and a worker's /metrics scraped and parsed while it runs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

import stepsource as ss
from stepsource.otel import TracingInterceptor
from stepsource.testing.processes import KILL_AT_ENV, WorkerProcesses

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import worker_app  # noqa: E402

pytestmark = pytest.mark.anyio

DEADLINE = 30


class Recording(ss.Interceptor):
    """Records what it wraps, as (its name, method, what)."""

    def __init__(self, name: str, calls: list[tuple[str, str, str]]) -> None:
        self.name = name
        self.calls = calls

    async def start(self, info: ss.StartInfo, call_next: Any) -> Any:
        info.headers[f"seen-by-{self.name}"] = info.step_id
        self.calls.append((self.name, "start", info.step_id))
        return await call_next()

    async def attempt(self, info: ss.AttemptInfo, call_next: Any) -> Any:
        self.calls.append((self.name, "attempt", f"{info.attempt} resumed={info.resumed}"))
        outcome = await call_next()
        self.calls.append((self.name, "attempt ended", outcome.status))
        self.headers = info.headers
        return outcome

    async def substep(self, info: ss.SubStepInfo, call_next: Any) -> Any:
        self.calls.append((self.name, "substep", f"{info.name} rerun={info.rerun}"))
        return await call_next()

    async def wait(self, info: ss.WaitInfo, call_next: Any) -> Any:
        self.calls.append((self.name, "wait", info.kind))
        return await call_next()

    async def message(self, info: ss.MessageInfo, call_next: Any) -> Any:
        self.calls.append((self.name, "message", f"{info.kind} {info.name}"))
        return await call_next()


def flow_engine(*interceptors: ss.Interceptor) -> ss.Engine:
    engine = ss.Engine("memory://", poll_interval=0.01, interceptors=interceptors)

    @engine.step("ic.flow")
    async def flow(ctx: ss.StepContext) -> str:
        first = await ctx.do("first", lambda: "a")
        await ctx.set_state("first", first)
        go = await ctx.wait_for_event("go")
        second = await ctx.do("second", lambda: "b")
        return f"{first}{go}{second}"

    return engine


async def run_flow(engine: ss.Engine) -> str:
    """Run one ic.flow to its end (it waits for the event "go" in between); its id."""
    async with engine:
        handle = await engine.start("ic.flow")
        with anyio.fail_after(DEADLINE):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        await handle.send_event("go", "-")
        assert await handle.result(timeout=DEADLINE) == "a-b"
    return handle.execution_id


async def test_interceptors_wrap_each_operation_once_and_never_a_replayed_one() -> None:
    calls: list[tuple[str, str, str]] = []
    outer, inner = Recording("outer", calls), Recording("inner", calls)
    engine = flow_engine(outer, inner)
    await run_flow(engine)
    seen = [(method, what) for name, method, what in calls if name == "outer"]
    assert seen == [
        ("start", "ic.flow"),
        ("attempt", "1 resumed=False"),
        ("substep", "first rerun=False"),
        ("wait", "event"),
        ("attempt ended", "waiting"),
        ("message", "event go"),
        # the wake-up replays "first" from the log: it reaches no interceptor; the wait runs
        # live again and ends (the event is there); "second" was never run before
        ("attempt", "1 resumed=True"),
        ("wait", "event"),
        ("substep", "second rerun=False"),
        ("attempt ended", "completed"),
    ]
    # the first listed is the outermost: it sees each operation first
    assert [(m, w) for n, m, w in calls if n == "inner"] == seen
    assert calls.index(("outer", "start", "ic.flow")) < calls.index(("inner", "start", "ic.flow"))
    # headers the start interceptors set reach every attempt
    assert outer.headers == {"seen-by-outer": "ic.flow", "seen-by-inner": "ic.flow"}


async def test_a_handler_reading_history_on_a_resume_is_one_attempt_to_interceptors() -> None:
    # with snapshots a resume reads only the open attempt's events; a handler that reads
    # ctx.history is then run again with every event, inside the same attempt
    calls: list[tuple[str, str, str]] = []
    engine = ss.Engine(
        "memory://", poll_interval=0.01, snapshot_every=2, interceptors=[Recording("r", calls)]
    )

    @engine.step("ic.history")
    async def history(ctx: ss.StepContext) -> int:
        ctx.add_history_entry("custom", {"n": 1})
        await ctx.do("a0", lambda: 0)
        await ctx.do("a1", lambda: 1)
        await ctx.sleep(0.05)
        return len(ctx.history)

    async with engine:
        handle = await engine.start("ic.history")
        assert await handle.result(timeout=DEADLINE) == 2  # what the resumed run read
    assert [(method, what) for _, method, what in calls] == [
        ("start", "ic.history"),
        ("attempt", "1 resumed=False"),
        ("substep", "a0 rerun=False"),
        ("substep", "a1 rerun=False"),
        ("wait", "sleep"),
        ("attempt ended", "waiting"),
        ("attempt", "1 resumed=True"),
        ("wait", "sleep"),
        ("attempt ended", "completed"),
    ]


async def test_a_waiting_execution_cancelled_ends_inside_the_attempt_interceptors() -> None:
    # a cancellation found in the inbox ends the execution without running the handler: no
    # attempt span, no 'cancelled' outcome and no end-to-end time were observed
    calls: list[tuple[str, str, str]] = []
    engine = flow_engine(Recording("r", calls))
    async with engine:
        handle = await engine.start("ic.flow")
        with anyio.fail_after(DEADLINE):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        await handle.cancel("not needed")
        with pytest.raises(ss.StepCancelledError):
            await handle.result(timeout=DEADLINE)
    assert [(method, what) for _, method, what in calls][-3:] == [
        ("message", "cancel cancel"),
        ("attempt", "1 resumed=True"),
        ("attempt ended", "cancelled"),
    ]


class SubstepsOnly(ss.Interceptor):
    """Overrides one hook in its class and sets another on the instance."""

    def __init__(self, calls: list[tuple[str, str, str]]) -> None:
        self.calls = calls

        async def on_commit(info: ss.CommitInfo, call_next: Any) -> Any:
            calls.append(("partial", "commit", str(info.events)))
            return await call_next()

        self.commit = on_commit  # type: ignore[method-assign]

    async def substep(self, info: ss.SubStepInfo, call_next: Any) -> Any:
        self.calls.append(("partial", "substep", info.name))
        return await call_next()


async def test_an_interceptor_overriding_some_hooks_sees_exactly_those() -> None:
    # the engine skips hooks an interceptor leaves to the pass-through defaults; the ones it
    # overrides, in its class or on the instance, still see every live operation
    calls: list[tuple[str, str, str]] = []
    engine = flow_engine(Recording("full", calls), SubstepsOnly(calls))
    await run_flow(engine)
    partial = [(method, what) for name, method, what in calls if name == "partial"]
    assert [p for p in partial if p[0] == "substep"] == [
        ("substep", "first"),
        ("substep", "second"),
    ]
    assert {m for m, _ in partial} == {"substep", "commit"}
    assert sum(int(w) for m, w in partial if m == "commit") >= 6  # every event made durable
    assert ("full", "substep", "second rerun=False") in calls


class Skipping(ss.Interceptor):
    """An interceptor whose ``method`` forgets to await call_next (and returns None)."""

    def __init__(self, method: str) -> None:
        async def skip(info: Any, call_next: Any) -> None:
            return None

        setattr(self, method, skip)


async def test_an_interceptor_that_skips_call_next_is_an_error_not_silence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Skipping call_next left a start unscheduled (the handle named no execution), an
    attempt never run (the execution stayed 'executing' with no word logged) and a ctx.do
    result recorded that no body made. Each is now a UsageError naming the interceptor."""
    skipping_start = ss.Engine("memory://", poll_interval=0.01, interceptors=[Skipping("start")])
    register_echo(skipping_start)
    async with skipping_start:
        with pytest.raises(ss.UsageError) as refused:
            await skipping_start.start("echo")
    assert refused.value.reason == (
        "Skipping.start() returned without awaiting call_next(): the execution was not scheduled"
    )
    assert await skipping_start.executions() == []

    skipping_body = ss.Engine("memory://", poll_interval=0.01, interceptors=[Skipping("substep")])
    register_echo(skipping_body)
    async with skipping_body:
        handle = await skipping_body.start("echo")
        with pytest.raises(ss.StepFailedError, match=r"Skipping.substep\(\) returned without"):
            await handle.result(timeout=10)

    skipping_attempt = ss.Engine(
        "memory://", poll_interval=0.01, lease_seconds=60, interceptors=[Skipping("attempt")]
    )
    register_echo(skipping_attempt)
    async with skipping_attempt:
        handle = await skipping_attempt.start("echo")
        with anyio.fail_after(10):
            while not any("the attempt was not run" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.01)
    line = next(r for r in caplog.records if "the attempt was not run" in r.getMessage())
    assert line.levelname == "ERROR"
    assert handle.execution_id in line.getMessage()


def register_echo(engine: ss.Engine) -> None:
    @engine.step("echo")
    async def echo(ctx: ss.StepContext) -> str:
        return str(await ctx.do("body", lambda: "from the body"))


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def spans_by_name(
    spans: Iterator[ReadableSpan] | tuple[ReadableSpan, ...],
) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


async def test_spans_of_one_execution_form_one_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = flow_engine(TracingInterceptor(tracer_provider=provider))
    execution_id = await run_flow(engine)
    spans = spans_by_name(exporter.get_finished_spans())
    assert sorted(spans) == [
        "stepsource.attempt",
        "stepsource.do",
        "stepsource.message",
        "stepsource.start",
        "stepsource.wait",
    ]
    [start] = spans["stepsource.start"]
    trace_id = start.context.trace_id
    assert [s.context.trace_id for s in spans["stepsource.attempt"]] == [trace_id, trace_id]
    assert all(
        s.parent is not None and s.parent.span_id == start.context.span_id
        for s in spans["stepsource.attempt"]
    )
    outcomes = [attrs(s)["stepsource.outcome"] for s in spans["stepsource.attempt"]]
    assert outcomes == ["waiting", "completed"]
    attempt_ids = {s.context.span_id for s in spans["stepsource.attempt"]}
    bodies = spans["stepsource.do"]
    assert [attrs(b)["stepsource.substep"] for b in bodies] == ["first", "second"]
    assert all(b.parent is not None and b.parent.span_id in attempt_ids for b in bodies)
    assert attrs(spans["stepsource.wait"][0])["stepsource.outcome"] == "suspended"
    others = [s for s in exporter.get_finished_spans() if s.name != "stepsource.do"]
    assert {attrs(s)["stepsource.execution_id"] for s in others} == {execution_id}
    assert all("stepsource.rerun" not in attrs(b) for b in bodies)  # set only when it may be


async def test_spans_a_body_makes_are_its_children_and_a_failed_body_is_an_error() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("user code")
    engine = ss.Engine("memory://", interceptors=[TracingInterceptor(tracer_provider=provider)])

    def sync_call() -> str:  # runs in a body thread with the handler's context
        with tracer.start_as_current_span("user.sync"):
            return "s"

    async def async_call() -> str:
        with tracer.start_as_current_span("user.async"):
            return "a"

    def broken() -> None:
        raise ValueError("no stock")

    @engine.step("ic.nested")
    async def nested(ctx: ss.StepContext) -> str:
        first = await ctx.do("sync", sync_call)
        second = await ctx.do("async", async_call)
        with contextlib.suppress(ss.SubStepFailedError):
            await ctx.do("broken", broken)
        return str(first) + str(second)

    async with engine:
        handle = await engine.start("ic.nested")
        assert await handle.result(timeout=DEADLINE) == "sa"
    spans = spans_by_name(exporter.get_finished_spans())
    bodies = {attrs(b)["stepsource.substep"]: b for b in spans["stepsource.do"]}
    for user, body in (("user.sync", "sync"), ("user.async", "async")):
        [made] = spans[user]
        assert made.parent is not None
        assert made.parent.span_id == bodies[body].context.span_id
    assert bodies["sync"].status.status_code is StatusCode.UNSET
    assert bodies["broken"].status.status_code is StatusCode.ERROR
    assert bodies["broken"].status.description == "ValueError: no stock"


# -- across processes -------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'steps.db'}"


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        db_url,
        "worker_app:engine",
        pythonpath=[str(TESTS_DIR)],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL", "OTEL_TRACES_EXPORTER"),
    ) as pool:
        yield pool


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_trace_continues_in_the_worker_and_marks_the_body_run_again_after_a_kill(
    tmp_path: Path, db_url: str, workers: WorkerProcesses
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = worker_app.engine.derive(
        url=db_url, workers=0, interceptors=[TracingInterceptor(tracer_provider=provider)]
    )
    effects, spans_file = tmp_path / "effects.txt", tmp_path / "spans.jsonl"
    handle = await client.start("wp.idempotent", {"effects": str(effects)})
    env = {"WORKER_APP_SPANS": str(spans_file)}
    w1 = workers.spawn("w1", lease_seconds=1, kill_at="after-substep-body", env=env)
    assert await w1.exited() == -signal.SIGKILL, w1.output()
    w2 = workers.spawn("w2", lease_seconds=1, env=env)
    await handle.result(timeout=DEADLINE)
    assert await w2.terminate(10) == 0, w2.output()
    await client.aclose()

    [start] = exporter.get_finished_spans()
    trace_id = start.context.trace_id
    worker_spans = read_spans(spans_file)
    assert worker_spans
    assert {s["trace_id"] for s in worker_spans} == {trace_id}
    attempts = [s for s in worker_spans if s["name"] == "stepsource.attempt"]
    # worker 1's attempt span never ended (SIGKILL): only worker 2's, resuming, is exported
    assert [a["attributes"]["stepsource.resumed"] for a in attempts] == [True]
    assert attempts[0]["parent_id"] == start.context.span_id
    charges = [s for s in worker_spans if s["name"] == "stepsource.do"]
    # the body ran twice (killed before its result was recorded): two spans, the second a rerun
    assert [c["attributes"].get("stepsource.rerun", False) for c in charges] == [False, True]
    assert len(effects.read_text().splitlines()) == 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_worker_serves_its_metrics_for_prometheus(
    tmp_path: Path, db_url: str, workers: WorkerProcesses
) -> None:
    client = worker_app.engine.derive(url=db_url, workers=0)
    port = free_port()
    w1 = workers.spawn("w1", args=["--metrics-port", str(port)])
    effects = tmp_path / "effects.txt"
    handles = [
        await client.start("wp.durable", {"effects": str(effects), "items": [1, 2]})
        for _ in range(3)
    ]
    for handle in handles:
        await handle.result(timeout=DEADLINE)

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("step_id") == "wp.durable":
                    key = sample.name + "".join(
                        f",{k}={v}" for k, v in sorted(sample.labels.items()) if k != "step_id"
                    )
                    values[key] = sample.value
        return values

    metrics = await anyio.to_thread.run_sync(scrape)
    with anyio.fail_after(DEADLINE):  # the depth is sampled every 5 s: the first sample
        while "stepsource_queue_depth" not in metrics:
            await anyio.sleep(0.2)
            metrics = await anyio.to_thread.run_sync(scrape)
    assert await w1.terminate(10) == 0, w1.output()
    await client.aclose()
    assert metrics["stepsource_queue_depth"] >= 0  # sampled (counted exactly: test_queue_depth)
    assert metrics["stepsource_executions_completed_total"] == 3
    assert metrics["stepsource_attempts_total,outcome=completed"] == 3
    assert metrics["stepsource_attempt_seconds_count"] == 3
    assert metrics["stepsource_end_to_end_seconds_count"] == 3
    assert metrics["stepsource_substep_seconds_count"] == 6  # two ctx.do bodies each
    # per execution, the handler's three commits: item-0's result (1 event); item-0's state
    # write with item-1's result (2); the last write, the checkpoint and the completion (3)
    assert metrics["stepsource_commit_events_count"] == 3 * 3
    assert metrics["stepsource_commit_events_sum"] == 3 * 6


async def test_a_worker_of_an_engine_that_traces_and_counts_adds_no_second_observer(
    tmp_path: Path, db_url: str, workers: WorkerProcesses
) -> None:
    # the engine has TracingInterceptor() and MetricsInterceptor() (on the default registry):
    # `--metrics-port` serves those metrics (a second MetricsInterceptor() on that registry
    # was a DuplicateTimeseries crash) and each span is made once (the worker added a tracer)
    client = worker_app.engine.derive(url=db_url, workers=0)
    port, spans_file = free_port(), tmp_path / "spans.jsonl"
    env = {"WORKER_APP_OBSERVED": "1", "WORKER_APP_SPANS": str(spans_file)}
    w1 = workers.spawn("w1", env=env, args=["--metrics-port", str(port)])
    effects = tmp_path / "effects.txt"
    handle = await client.start("wp.durable", {"effects": str(effects), "items": [1, 2]})
    await handle.result(timeout=DEADLINE)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await anyio.to_thread.run_sync(scrape)
    assert await w1.terminate(10) == 0, w1.output()
    await client.aclose()
    completed = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "stepsource_executions_completed_total"
        and sample.labels.get("step_id") == "wp.durable"
    ]
    assert completed == [1]
    names = [span["name"] for span in read_spans(spans_file)]
    assert names.count("stepsource.attempt") == 1
    assert names.count("stepsource.do") == 2


async def test_interceptors_on_one_registry_count_into_the_same_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from stepsource.metrics import MetricsInterceptor

    registry = CollectorRegistry()  # one per engine of a process was a DuplicateTimeseries
    engines = [
        ss.Engine("memory://", interceptors=[MetricsInterceptor(registry)]) for _ in range(2)
    ]
    for engine in engines:
        register_echo(engine)
        async with engine:
            await (await engine.start("echo")).result(timeout=DEADLINE)
    total = registry.get_sample_value("stepsource_executions_completed_total", {"step_id": "echo"})
    assert total == 2


class BreaksAfterCommits(ss.Interceptor):
    """A commit interceptor that raises after the first ``times`` commits it sees are made."""

    def __init__(self, times: int) -> None:
        self.left = times

    async def commit(self, info: ss.CommitInfo, call_next: Any) -> Any:
        written = await call_next()
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("the audit log is down")
        return written


async def test_a_commit_interceptor_raising_after_the_commit_is_not_the_handlers_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It reached the handler as the ctx.do's exception and failed the execution for good
    (then a second failure was refused as 'already failed'); the commit is made, so the
    execution goes on from it on its next run, as after an attempt interceptor's error."""
    engine = ss.Engine(
        "memory://", poll_interval=0.01, lease_seconds=0.3, interceptors=[BreaksAfterCommits(2)]
    )
    bodies: list[str] = []
    caught: list[str] = []

    def body(name: str, value: str) -> str:
        bodies.append(name)
        return value

    @engine.step("ic.audited")
    async def audited(ctx: ss.StepContext) -> str:
        try:
            first = str(await ctx.do("first", lambda: body("first", "a")))
        except RuntimeError as error:  # the handler's own handling: it never sees it now
            caught.append(str(error))
            first = "caught"
        second = str(await ctx.do("second", lambda: body("second", "b")))
        return f"{first}{second}"

    async with engine:
        handle = await engine.start("ic.audited")
        assert await handle.result(timeout=DEADLINE) == "ab"
    assert caught == []
    assert bodies == ["first", "second"]  # each made commit stays made: no body ran twice
    logged = [r for r in caplog.records if "the audit log is down" in r.getMessage()]
    assert logged
    assert all(handle.execution_id in r.getMessage() for r in logged)


async def test_an_interceptor_that_is_not_a_subclass_is_served_for_the_methods_it_has() -> None:
    """The docs say an interceptor is any object with some of the methods; one defining only
    ``substep`` failed the first start with an AttributeError (no ``start`` on its class)."""
    seen: list[str] = []

    class OnlyBodies:
        async def substep(self, info: ss.SubStepInfo, call_next: Any) -> Any:
            seen.append(info.name)
            return await call_next()

    engine = ss.Engine("memory://", poll_interval=0.01, interceptors=[OnlyBodies()])  # type: ignore[list-item]
    register_echo(engine)
    async with engine:
        handle = await engine.start("echo")
        assert await handle.result(timeout=10) == "from the body"
    assert seen == ["body"]
