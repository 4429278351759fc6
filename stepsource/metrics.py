"""Prometheus metrics for stepsource (the ``otel`` extra brings prometheus-client).

```python
import stepsource as ss
from stepsource.metrics import MetricsInterceptor

engine = ss.Engine(url, interceptors=[MetricsInterceptor()])
```

``stepsource worker MODULE:ENGINE --metrics-port 9464`` installs it and serves ``/metrics``
on 127.0.0.1 (``--metrics-host`` to bind elsewhere). Metrics, labelled by ``step_id``:

==========================================  =========  =========================================
metric                                      type       what
==========================================  =========  =========================================
``stepsource_executions_started_total``     counter    executions scheduled by this process
``stepsource_attempts_total``               counter    handler runs, by ``outcome`` (the status
                                                       the execution has after it: completed,
                                                       failed, retrying, waiting, cancelled...)
``stepsource_executions_completed_total``   counter    executions that completed here
``stepsource_executions_failed_total``      counter    executions that failed for good here
``stepsource_executions_retried_total``     counter    attempts that failed with a retry coming
``stepsource_attempt_seconds``              histogram  one handler run and its outcome's commit
``stepsource_schedule_to_start_seconds``    histogram  from an attempt's due time to its start
``stepsource_end_to_end_seconds``           histogram  from scheduling to the end of an execution
``stepsource_substep_seconds``              histogram  a ``ctx.do`` body
``stepsource_messages_total``               counter    signals, events, updates, cancellations
                                                       sent by this process, by ``kind``
``stepsource_queue_depth``                  gauge      runnable executions waiting for a worker
                                                       (SQLite and memory count it; sampled
                                                       every 5 s by ``stepsource worker``)
``stepsource_replay_seconds``               histogram  a resumed run replaying its record
``stepsource_commit_events``                histogram  events per commit (buffered operations
                                                       share commits at side-effect boundaries)
==========================================  =========  =========================================
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from stepsource.adapters.ports import Backend
from stepsource.engine.clock import Clock
from stepsource.engine.interceptors import (
    AttemptInfo,
    CommitInfo,
    Interceptor,
    MessageInfo,
    StartInfo,
    SubStepInfo,
)

__all__ = ["MetricsInterceptor", "sample_queue_depth", "serve_metrics"]

CallNext = Callable[[], Awaitable[Any]]
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class _Collectors:
    """The metrics of one registry: every :class:`MetricsInterceptor` on it counts into these
    (a registry holds one metric of each name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, ["step_id", *labels], registry=registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["step_id"], buckets=_LATENCY, registry=registry)

        self.started = counter("stepsource_executions_started", "executions scheduled")
        self.attempts = counter("stepsource_attempts", "handler runs by outcome", "outcome")
        self.completed = counter("stepsource_executions_completed", "executions completed")
        self.failed = counter("stepsource_executions_failed", "executions failed for good")
        self.retried = counter("stepsource_executions_retried", "attempts failed, retry coming")
        self.messages = counter("stepsource_messages", "messages sent", "kind")
        self.attempt_seconds = histogram("stepsource_attempt_seconds", "one handler run")
        self.schedule_to_start = histogram(
            "stepsource_schedule_to_start_seconds", "due time to attempt start"
        )
        self.end_to_end = histogram("stepsource_end_to_end_seconds", "scheduled to ended")
        self.substep_seconds = histogram("stepsource_substep_seconds", "a ctx.do body")
        self.replay_seconds = histogram(
            "stepsource_replay_seconds", "a resumed run replaying its record"
        )
        self.queue_depth = Gauge(
            "stepsource_queue_depth",
            "runnable executions waiting for a worker",
            ["step_id"],
            registry=registry,
        )
        self.commit_events = Histogram(
            "stepsource_commit_events",
            "events per commit of an execution",
            ["step_id"],
            buckets=(1, 2, 3, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )


#: each registry's collectors, made by the first interceptor on it
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = weakref.WeakKeyDictionary()
_COLLECTORS_LOCK = threading.Lock()


class MetricsInterceptor(Interceptor):
    """Counts and times what the engine does (see the module docstring). Interceptors on one
    registry (the default one, say: one per engine of a process) count into the same
    metrics, told apart by their ``step_id`` labels."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        with _COLLECTORS_LOCK:
            shared = _COLLECTORS.get(registry)
            if shared is None:
                shared = _COLLECTORS[registry] = _Collectors(registry)
        self.started = shared.started
        self.attempts = shared.attempts
        self.completed = shared.completed
        self.failed = shared.failed
        self.retried = shared.retried
        self.messages = shared.messages
        self.attempt_seconds = shared.attempt_seconds
        self.schedule_to_start = shared.schedule_to_start
        self.end_to_end = shared.end_to_end
        self.substep_seconds = shared.substep_seconds
        self.replay_seconds = shared.replay_seconds
        self.queue_depth = shared.queue_depth
        self.commit_events = shared.commit_events
        # each metric's child per label values, looked up once: ``metric.labels(...)``
        # checks the values and takes the metric's lock on every call (about as much as the
        # observation itself), and an attempt observes several
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _of(self, metric: Counter | Histogram | Gauge, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    async def start(self, info: StartInfo, call_next: CallNext) -> Any:
        result = await call_next()
        self._of(self.started, info.step_id).inc()
        return result

    async def attempt(self, info: AttemptInfo, call_next: CallNext) -> Any:
        began = time.time()
        if not info.resumed:
            self._of(self.schedule_to_start, info.step_id).observe(
                max(began - info.due_ms / 1000, 0.0)
            )
        outcome = await call_next()
        status = outcome.status
        ended = time.time()
        step = info.step_id
        if info.resumed:
            self._of(self.replay_seconds, step).observe(outcome.replay_seconds)
        self._of(self.attempt_seconds, step).observe(ended - began)
        self._of(self.attempts, step, str(status)).inc()
        if status == "completed":
            self._of(self.completed, step).inc()
        elif status == "failed":
            self._of(self.failed, step).inc()
        elif status == "retrying":
            self._of(self.retried, step).inc()
        if status in ("completed", "failed", "cancelled"):
            self._of(self.end_to_end, step).observe(max(ended - info.scheduled_ms / 1000, 0.0))
        return outcome

    async def commit(self, info: CommitInfo, call_next: CallNext) -> Any:
        result = await call_next()
        self._of(self.commit_events, info.step_id).observe(info.events)
        return result

    async def substep(self, info: SubStepInfo, call_next: CallNext) -> Any:
        began = time.perf_counter()
        try:
            return await call_next()
        finally:
            self._of(self.substep_seconds, info.step_id).observe(time.perf_counter() - began)

    async def message(self, info: MessageInfo, call_next: CallNext) -> Any:
        result = await call_next()
        self._of(self.messages, info.step_id or "", info.kind).inc()
        return result


async def sample_queue_depth(
    metrics: MetricsInterceptor,
    backend: Backend,
    step_ids: list[str],
    clock: Clock,
    interval: float = 5.0,
) -> None:
    """Set ``stepsource_queue_depth`` for each step every ``interval`` seconds, until
    cancelled (backends that do not count their queue leave it unset)."""
    while True:
        now_ms = clock.now_ms()
        for step_id in step_ids:
            depth = await backend.queue_depth([step_id], now_ms)
            if depth is not None:
                metrics.queue_depth.labels(step_id).set(depth)
        await anyio.sleep(interval)


def serve_metrics(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> None:
    """Serve ``/metrics`` for Prometheus on ``host:port`` (a daemon thread)."""
    start_http_server(port, addr=host, registry=registry)
