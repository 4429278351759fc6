"""Steps run by real ``stepsource worker worker_app:engine`` processes (test_worker_process.py).

The worker subprocesses import this module from the tests directory (their cwd); the test
process imports it too, to start executions with the same registrations and to run the
uninterrupted reference. Every side effect a sub-step body has is one line appended to the
file named by the step's ``effects`` input, so a test can count how often each body ran.

Environment switches, set by the test on one worker process only:

- ``WORKER_APP_LOG_TO_STDERR``: send warnings (the engine's "taken over" warning) to stderr.
- ``WORKER_APP_BLOCK=async``: the ``wait`` body of ``wp.blocking`` awaits forever (cancellable,
  as an awaited network call that never answers would be).
- ``WORKER_APP_SPANS=<path>``: the process's OpenTelemetry spans, one JSON line each.
- ``WORKER_APP_OBSERVED``: the engine has its own tracing and metrics interceptors.
- ``WORKER_APP_BLOCK=sync``: the ``hold`` body of ``wp.zombie`` blocks the whole event loop
  until its gate file exists (as a long blocking call or a stop-the-world pause would).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any

import anyio

import stepsource as ss

if os.environ.get("WORKER_APP_LOG_TO_STDERR"):
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

if os.environ.get("WORKER_APP_SPANS"):
    # spans go to a file, one JSON line each, written as each span ends (a SIGKILL loses none)
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class _FileExporter(SpanExporter):
        def __init__(self, path: str) -> None:
            self.path = path

        def export(self, spans: Any) -> SpanExportResult:
            with open(self.path, "a", encoding="utf-8") as file:
                for span in spans:
                    parent = span.parent.span_id if span.parent is not None else None
                    line = {
                        "name": span.name,
                        "trace_id": span.context.trace_id,
                        "span_id": span.context.span_id,
                        "parent_id": parent,
                        "attributes": dict(span.attributes or {}),
                    }
                    file.write(json.dumps(line) + "\n")
            return SpanExportResult.SUCCESS

    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_FileExporter(os.environ["WORKER_APP_SPANS"])))
    trace.set_tracer_provider(_provider)

_observers: list[ss.Interceptor] = []
if os.environ.get("WORKER_APP_OBSERVED"):
    # the engine traces and counts by itself, as the docs show: the worker must not add more
    from stepsource.metrics import MetricsInterceptor
    from stepsource.otel import TracingInterceptor

    _observers = [TracingInterceptor(), MetricsInterceptor()]

#: URL, worker count and lease are overridden by ``stepsource worker``; constructing does no I/O
engine = ss.Engine(
    "memory://", workers=1, lease_seconds=1.0, poll_interval=0.05, interceptors=_observers
)

#: how often a blocked body looks for its gate file
_GATE_POLL = 0.02


def effect(path: str, line: str) -> None:
    """Append one line to the side-effect file (closed at once: a SIGKILL loses nothing)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def _square(path: str, name: str, value: int) -> int:
    effect(path, name)
    return value * value


@engine.step("wp.idempotent")
async def idempotent(ctx: ss.StepContext, effects: str) -> str:
    """The idempotency-key pattern: a recorded UUID handed to a side effect. The key is
    durable before the body can see it, so every run of the body gets the same one."""
    key = str(await ctx.uuid4())
    await ctx.set_state("phase", "charging")  # buffered: committed with the result below
    await ctx.do("charge", functools.partial(effect, effects, f"charge {key}"))
    return key


@engine.step("wp.escalate")
async def escalate(ctx: ss.StepContext, effects: str) -> str:
    """Wait for approval; on timeout, escalate. The timeout is durable before the escalation
    body runs, so an approval arriving afterwards cannot change the branch taken."""
    try:
        await ctx.wait_for_event("approve", timeout=0.2)
    except ss.WaitTimeout:
        await ctx.do("escalate", functools.partial(effect, effects, "escalate"))
        return "escalated"
    return "approved"


@engine.step("wp.durable.each", durability="each")
@engine.step("wp.durable")
async def durable(
    ctx: ss.StepContext, effects: str, items: list[int], nap: float | None = None
) -> dict[str, Any]:
    """Sub-steps with side effects, state updates and checkpoints; ``nap`` adds a durable
    sleep after the second item (the execution suspends and holds no worker meanwhile)."""
    total = 0
    squares: list[int] = []
    for i, item in enumerate(items):
        name = f"item-{i}"
        square = await ctx.do(name, functools.partial(_square, effects, name, item))
        squares.append(square)
        total += square
        await ctx.update_state({"total": total, "done": i + 1})
        if i % 2 == 1:
            await ctx.create_checkpoint(
                {"after": name}, cursor=i + 1, items_processed=i + 1, accumulated_results=squares
            )
        if i == 1 and nap is not None:
            await ctx.sleep(nap)
    await ctx.complete({"items": len(items)})
    return {"total": total, "squares": squares}


@engine.step("wp.blocking")
async def blocking(ctx: ss.StepContext, effects: str) -> dict[str, Any]:
    """A handler that, in the worker started with WORKER_APP_BLOCK=async, never finishes its
    second sub-step by itself."""
    first = await ctx.do("first", functools.partial(_square, effects, "first", 3))

    async def wait_for_gate() -> str:
        effect(effects, "wait")
        if os.environ.get("WORKER_APP_BLOCK") == "async":
            await anyio.sleep_forever()
        return "opened"

    opened = await ctx.do("wait", wait_for_gate)
    await ctx.set_state("opened", opened)
    second = await ctx.do("second", functools.partial(_square, effects, "second", 4))
    return {"first": first, "opened": opened, "second": second}


@engine.step("wp.zombie")
async def zombie(ctx: ss.StepContext, effects: str, gate: str) -> dict[str, Any]:
    """A handler that, in the worker started with WORKER_APP_BLOCK=sync, stalls its whole
    process inside a sub-step (no lease renewals) until a file exists."""
    first = await ctx.do("first", functools.partial(_square, effects, "first", 5))

    def hold() -> int:
        effect(effects, f"hold {os.getpid()}")
        if os.environ.get("WORKER_APP_BLOCK") == "sync":
            while not os.path.exists(gate):
                time.sleep(_GATE_POLL)
        return os.getpid()

    holder = await ctx.do("hold", hold)
    await ctx.set_state("holder", holder)
    second = await ctx.do("second", functools.partial(_square, effects, "second", 6))
    return {"first": first, "holder": holder, "second": second}
