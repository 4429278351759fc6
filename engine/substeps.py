"""``ctx.do``: a named sub-step whose result, or failure, is recorded once.

A result recorded in this or an earlier attempt is returned from the record without running
the body; otherwise the body runs (a sync one in a worker thread, inside the engine's
interceptors, under a retry policy and a timeout when given: :mod:`.substep_policy`) and its
outcome is committed before ``ctx.do`` returns or raises, with everything buffered before it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextvars import Token
from typing import Any

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import error_text, with_article
from stepsource.engine.bodies import run_body
from stepsource.engine.definitions import RetryPolicy
from stepsource.engine.failures import users_own
from stepsource.engine.faults import kill_point
from stepsource.engine.interceptors import SubStepInfo, hooked, intercept
from stepsource.engine.recorder import Recorder
from stepsource.engine.scope import CONTROL_FLOW, SCOPE
from stepsource.engine.substep_policy import check_policy, run_with_policy, tries_of
from stepsource.errors import SubStepFailedError, UsageError

__all__ = ["run_substep"]


async def run_substep(
    recorder: Recorder,
    seen: set[str],
    name: str,
    fn: Callable[[], Any],
    *,
    flush_first: bool,
    retry: RetryPolicy | None,
    timeout: float | None,
) -> Any:
    """What ``ctx.do(name, fn, ...)`` returns; ``seen``: the names run in this attempt."""
    where = {"execution_id": recorder.aggregate.execution_id, "step_id": recorder.aggregate.step_id}
    if not isinstance(name, str) or not name:
        raise UsageError("ctx.do needs a non-empty str name", **where)
    check_policy(retry, timeout, where)
    body: object = fn  # what the caller passed, whatever the annotation says
    if not callable(body):
        if inspect.iscoroutine(body):
            body.close()  # never awaited: closed here, so Python does not warn about it
        raise UsageError(
            f"ctx.do({name!r}, ...) needs a function (sync or async) as its body, not "
            f"{with_article(type(body).__name__)}",
            hint="Pass the function itself, not its result: ctx.do('charge', charge) or "
            "ctx.do('charge', lambda: charge(order))",
            **where,
        )
    if name in seen:
        raise UsageError(
            f"ctx.do({name!r}) ran twice in this attempt",
            hint="Sub-step names are unique in an execution and stable across deploys; "
            "add a loop index or an item id to the name",
            **where,
        )
    seen.add(name)
    # this attempt's record first (a concurrent branch may already have folded it in)
    recorded = recorder.replay.match_substep(name)
    if isinstance(recorded, ev.SubStepCompleted):
        return copy.deepcopy(recorded.value)
    if isinstance(recorded, ev.SubStepFailed):
        raise SubStepFailedError(
            name,
            recorded.error_type,
            recorded.error_message,
            tries=tries_of(recorder, name),
            **where,
        )
    earlier = recorder.aggregate.substeps.get(name)
    if earlier is not None and earlier["ok"]:
        return copy.deepcopy(earlier["value"])
    recorder.replay.going_live()  # a query's replay stops before running a body
    recorder.check_lease(f"the body of ctx.do({name!r})")
    if flush_first:
        await recorder.commit()
    observer = recorder.runtime.on_substep_body
    if observer is not None:
        observer(recorder.aggregate.execution_id, name)
    parent = SCOPE.get()
    token: Token[str] | None = SCOPE.set(name)
    body_started_ms = recorder.runtime.clock.now_ms()
    try:
        if retry is None and timeout is None:
            result = await _run_body(recorder, name, fn)
        else:
            result = await run_with_policy(
                recorder,
                name,
                lambda: _run_body(recorder, name, fn),
                retry=retry,
                timeout=timeout,
                scope=parent,
            )
    except CONTROL_FLOW:
        raise
    except BaseException as error:  # the body's failure is its recorded outcome
        if not users_own(error):  # a cancellation, Ctrl-C: they go on
            raise
        if token is not None:
            SCOPE.reset(token)
            token = None
        recorder.replay.finish_replay()
        op = recorder.closing_op(parent)
        recorder.aggregate.record_substep(
            name,
            error=error,
            timestamp=recorder.now(),
            op=op,
            body_started_ms=body_started_ms,
        )
        await recorder.commit()
        tries = tries_of(recorder, name)
        text = error_text(error, about=recorder.aggregate.execution_id)
        raise SubStepFailedError(name, type(error).__name__, text, tries=tries, **where) from error
    finally:
        if token is not None:
            SCOPE.reset(token)
    kill_point("after-substep-body")
    recorder.replay.finish_replay()  # what comes next is appended after the log's end
    op = recorder.closing_op(parent)
    recorder.aggregate.record_substep(
        name,
        value=result,
        timestamp=recorder.now(),
        op=op,
        body_started_ms=body_started_ms,
    )
    await recorder.commit()
    return copy.deepcopy(recorder.aggregate.substeps[name]["value"])


async def _run_body(recorder: Recorder, name: str, fn: Callable[[], Any]) -> Any:
    """Run a ctx.do body (sync or async) inside the engine's interceptors."""
    rerun = recorder.taken_over and not recorder.ran_a_body
    recorder.ran_a_body = True

    runtime = recorder.runtime

    async def body() -> Any:  # a sync body runs in a worker thread (engine/bodies.py)
        # the only execution this worker holds a lease for: waiting in place stalls no other
        return await run_body(fn, runtime.body_threads, alone=len(runtime.lease_deadlines) <= 1)

    interceptors = hooked(recorder.runtime.interceptors, "substep")
    if not interceptors:
        return await body()
    info = SubStepInfo(
        execution_id=recorder.aggregate.execution_id,
        step_id=recorder.aggregate.step_id,
        attempt=recorder.aggregate.next_attempt_number(),
        name=name,
        idempotency_key=f"{recorder.aggregate.execution_id}/{name}",
        rerun=rerun,
    )
    return await intercept(interceptors, "substep", info, body)
