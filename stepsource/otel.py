"""OpenTelemetry tracing for stepsource (the ``otel`` extra): an interceptor that makes spans.

```python
import stepsource as ss
from stepsource.otel import TracingInterceptor

engine = ss.Engine(url, interceptors=[TracingInterceptor()])
```

Spans, all named ``stepsource.<what>`` and attributed in the ``stepsource.*`` namespace:

==========================  ========  ============================================================
span                        kind      when
==========================  ========  ============================================================
``stepsource.start``        PRODUCER  an execution is scheduled (``engine.start``, a child start)
``stepsource.attempt``      CONSUMER  a worker runs a handler (an attempt, a wake-up, a takeover)
``stepsource.do``           INTERNAL  a ``ctx.do`` body runs (``stepsource.substep``, and
                                      ``stepsource.rerun`` when it may have run before a crash;
                                      the rest is its parent attempt span's)
``stepsource.wait``         INTERNAL  a wait runs live (it ends, or the execution suspends)
``stepsource.message``      PRODUCER  a client sends a signal, event, update or cancellation
==========================  ========  ============================================================

Attributes: ``stepsource.execution_id``, ``stepsource.step_id``, ``stepsource.step_version``,
``stepsource.attempt``, ``stepsource.flow_id``, ``stepsource.worker_id``,
``stepsource.resumed``, ``stepsource.substep``, ``stepsource.rerun``,
``stepsource.idempotency_key``, ``stepsource.wait.kind``, ``stepsource.message.kind``,
``stepsource.outcome`` (the execution's status after an attempt: ``completed``,
``failed``, ``retrying``, ``waiting``...; ``suspended`` or the end of a wait).

The start span's context is injected into the execution's start headers with the global
propagator (W3C ``traceparent`` by default) and stored in the log, so a worker in another
process continues the same trace. Operations matched from the log on replay make no span.
Spans go to the global tracer provider unless one is passed: with the SDK configured by
``opentelemetry-instrument`` (or :func:`configure_from_environment`), the standard
``OTEL_*`` variables apply.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from stepsource.engine.interceptors import (
    AttemptInfo,
    Interceptor,
    MessageInfo,
    StartInfo,
    SubStepInfo,
    WaitInfo,
)
from stepsource.engine.waiting import Suspended
from stepsource.errors import UsageError

__all__ = ["TracingInterceptor", "configure_from_environment"]

CallNext = Callable[[], Awaitable[Any]]


class TracingInterceptor(Interceptor):
    """Spans for starts, attempts, sub-steps, waits and messages (see the module docstring)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("stepsource", tracer_provider=tracer_provider)

    async def start(self, info: StartInfo, call_next: CallNext) -> Any:
        attributes = {
            "stepsource.execution_id": info.execution_id,
            "stepsource.step_id": info.step_id,
        }
        if info.parent_execution_id:
            attributes["stepsource.parent_execution_id"] = info.parent_execution_id
        with self._tracer.start_as_current_span(
            "stepsource.start", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            propagate.inject(info.headers)
            return await call_next()

    async def attempt(self, info: AttemptInfo, call_next: CallNext) -> Any:
        parent = propagate.extract(info.headers)
        attributes: dict[str, Any] = {
            "stepsource.execution_id": info.execution_id,
            "stepsource.step_id": info.step_id,
            "stepsource.step_version": info.step_version,
            "stepsource.attempt": info.attempt,
            "stepsource.worker_id": info.worker_id,
            "stepsource.resumed": info.resumed,
        }
        if info.flow_id:
            attributes["stepsource.flow_id"] = info.flow_id
        with self._tracer.start_as_current_span(
            "stepsource.attempt",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            outcome = await call_next()
            span.set_attribute("stepsource.outcome", outcome.status)
            span.set_attribute("stepsource.replay_seconds", outcome.replay_seconds)
            if outcome.status == "failed":
                span.set_status(Status(StatusCode.ERROR, "the execution failed"))
            return outcome

    async def substep(self, info: SubStepInfo, call_next: CallNext) -> Any:
        # the execution, step and attempt are its parent attempt span's: a body span carries
        # only what is its own (a handler may run thousands of bodies)
        # (the hot path: start_span and attach rather than start_as_current_span's context
        # manager, and attributes set on the span, about a fifth less per span)
        span = self._tracer.start_span("stepsource.do", record_exception=False)
        span.set_attribute("stepsource.substep", info.name)
        if info.rerun:
            span.set_attribute("stepsource.rerun", True)
        token = context.attach(trace.set_span_in_context(span))
        try:
            return await call_next()
        except Exception as exc:  # why: the span's status says the body failed; re-raised
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            context.detach(token)
            span.end()

    async def wait(self, info: WaitInfo, call_next: CallNext) -> Any:
        with self._tracer.start_as_current_span(
            "stepsource.wait",
            attributes={
                "stepsource.execution_id": info.execution_id,
                "stepsource.step_id": info.step_id,
                "stepsource.attempt": info.attempt,
                "stepsource.wait.kind": info.kind,
                "stepsource.wait.name": info.name,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                ended = await call_next()
            except Suspended:
                span.set_attribute("stepsource.outcome", "suspended")
                raise
            span.set_attribute("stepsource.outcome", type(ended).__name__)
            return ended

    async def message(self, info: MessageInfo, call_next: CallNext) -> Any:
        attributes = {
            "stepsource.execution_id": info.execution_id,
            "stepsource.message.kind": info.kind,
            "stepsource.message.name": info.name,
        }
        if info.step_id:
            attributes["stepsource.step_id"] = info.step_id
        with self._tracer.start_as_current_span(
            "stepsource.message", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            return await call_next()


def configure_from_environment() -> bool:
    """Give the process an SDK tracer provider configured by the standard ``OTEL_*``
    variables, unless one is configured already (by ``opentelemetry-instrument``, say).

    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the resource;
    ``OTEL_TRACES_EXPORTER`` chooses the exporter: ``console``, ``otlp`` (needs the
    ``opentelemetry-exporter-otlp`` package) or ``none``. Returns whether it configured one.
    """
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not exporter_name or exporter_name == "none":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return False  # configured already
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as error:
            raise UsageError(
                "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter package",
                hint="pip install opentelemetry-exporter-otlp",
            ) from error
        exporter = OTLPSpanExporter()  # endpoint and headers from OTEL_EXPORTER_OTLP_*
    else:
        raise UsageError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not one stepsource can set up",
            hint="use console, otlp or none, or run under opentelemetry-instrument",
        )
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True
