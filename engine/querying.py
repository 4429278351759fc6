"""Answering ``handle.query(name, *args)`` by a read-only replay in the asking process.

The step must be registered in this process (import the module that defines it). The
handler is run against the current attempt's record without appending anything and without
running any side effect: it stops at the first operation that is not in the log (where the
execution is now), the rest of the log is folded in, and the query handler registered with
``ctx.on_query`` answers from that state. No worker has to be running for a query.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from stepsource.engine.attempt import Attempt, Runtime, _find
from stepsource.engine.context import StepContext
from stepsource.engine.replay import ReplayCursor, ReplayEnd
from stepsource.engine.waiting import Suspended
from stepsource.projections.folds import replay

if TYPE_CHECKING:
    from stepsource.engine.engine import Engine

__all__ = ["run_query"]


async def run_query(engine: Engine, execution_id: str, name: str, args: tuple[Any, ...]) -> Any:
    runtime: Runtime = engine._runtime()
    aggregate, events = await runtime.store.load(execution_id)
    definition = engine.definition(aggregate.step_id)
    start = aggregate.attempt_started_version or len(events)
    base = replay(events[:start])
    assert base is not None
    cursor = ReplayCursor(base, events[start:], read_only=True)
    attempt = Attempt(runtime, definition, base, cursor, events[:start])
    ctx = StepContext(attempt)
    try:
        validated = definition.validate_input(base.input, execution_id=execution_id)
        with anyio.fail_after(definition.timeout):
            await definition.handler(ctx, **definition.handler_kwargs(validated))
    except Exception:  # noqa: BLE001 - the recorded run raised here too; state is the log's
        pass
    except BaseException as error:  # a ReplayEnd or Suspended: where the execution is now
        if _find(error, ReplayEnd) is None and _find(error, Suspended) is None:
            raise
    cursor.drain()
    return await ctx.answer_query(name, args)
