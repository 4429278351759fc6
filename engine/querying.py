"""Answering ``handle.query(name, *args)`` by a read-only replay in the asking process.

The step must be registered in this process (import the module that defines it). The
handler is run (by the one runner, :mod:`.runner`) against the current attempt's record
without appending anything and without running any side effect: it stops at the first
operation that is not in the log (where the execution is now), the rest of the log is folded
in, and the query handler registered with ``ctx.on_query`` answers from that state. No
worker has to be running for a query.
"""

from __future__ import annotations

from typing import Any

from stepsource.engine.recorder import Recorder
from stepsource.engine.replay import ReplayCursor, ReplayEnd
from stepsource.engine.runner import run_handler
from stepsource.engine.runtime import Runtime
from stepsource.engine.waiting import Suspended
from stepsource.projections.folds import replay

__all__ = ["run_query"]


async def run_query(runtime: Runtime, execution_id: str, name: str, args: tuple[Any, ...]) -> Any:
    aggregate, events = await runtime.store.load(execution_id)
    definition = runtime.definition(
        aggregate.step_id,
        execution_id=execution_id,
        doing="querying it: a query replays the handler in the process that asks",
    )
    start = aggregate.attempt_started_version or len(events)
    base = replay(events[:start])
    assert base is not None
    cursor = ReplayCursor(base, events[start:], read_only=True)
    run = await run_handler(Recorder(runtime, definition, base, cursor, events[:start]))
    # the recorded run raised there too, or the replay reached where the execution is now:
    # either way its state is the log's
    if run.error is not None and not isinstance(run.error, (Exception, ReplayEnd, Suspended)):
        raise run.error
    cursor.drain()
    return await run.ctx.answer_query(name, args)
