"""Child executions: ``ctx.start_step`` / ``ctx.run_step``, and waiting for children.

Starting a child is a recording operation (ChildStarted). The child's execution id derives
from the parent's id and the operation's coordinates, so a replay, or a parent that crashed
between starting the child and recording it, never starts a second child: the start is
idempotent. Waiting for a child is a wait like any other: the parent suspends holding no
worker; the child's worker nudges the parent's inbox when the child ends, and the parent,
woken, reads the child's outcome from the child's own log and records it (WaitSatisfied).
A safety wake-up every CHILD_RECHECK_MS covers a nudge lost with a crashed worker.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject, with_article
from stepsource.engine.ids import child_execution_id
from stepsource.engine.recorder import Recorder
from stepsource.engine.runtime import Lineage
from stepsource.engine.waiting import Outcome, wait
from stepsource.errors import ChildFailedError, StateValueError, UsageError

__all__ = ["CHILD_RECHECK_MS", "ChildHandle", "child_outcome", "start_child", "wait_children"]

CHILD_RECHECK_MS = 60_000
_TERMINAL = (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)


class ChildHandle:
    """A child execution started by ``ctx.start_step``; ``await result()`` waits durably."""

    def __init__(
        self, recorder: Recorder, execution_id: str, step_id: str, *, optional: bool
    ) -> None:
        self._recorder = recorder
        self.execution_id = execution_id
        self.step_id = step_id
        self.optional = optional

    def __repr__(self) -> str:
        return f"ChildHandle({self.step_id!r}, {self.execution_id!r})"

    async def result(self) -> Any:
        """The child's output. A failed child raises ChildFailedError, unless it is optional:
        then the result is None and the parent carries on."""
        ended = await wait_children(self._recorder, [self.execution_id])
        return unwrap(self._recorder, ended, optional=self.optional)


def unwrap(recorder: Recorder, outcome: JSONObject, *, optional: bool) -> Any:
    if outcome.get("status") == "completed":
        return copy.deepcopy(outcome.get("result"))
    if optional:
        return None
    raise ChildFailedError(
        f"child execution {outcome.get('execution_id')} of step {outcome.get('step_id')!r} "
        f"{outcome.get('status')}: {outcome.get('error')}",
        hint="Catch ChildFailedError to carry on, or mark the child step optional",
        **recorder.where(),
    )


async def start_child(
    recorder: Recorder,
    step_id: str,
    input: Mapping[str, Any] | None,
    *,
    node: str | None = None,
    optional: bool | None = None,
    config: Mapping[str, Any] | None = None,
    dependencies: Mapping[str, Any] | None = None,
) -> ChildHandle:
    aggregate = recorder.aggregate
    if not isinstance(step_id, str) or not step_id:
        raise UsageError(
            "a child step id must be a non-empty str",
            execution_id=aggregate.execution_id,
            step_id=aggregate.step_id,
        )
    if input is not None and not isinstance(input, Mapping):
        raise StateValueError(
            f"start_step({step_id!r}) needs its input as a dict, not "
            f"{with_article(type(input).__name__)}",
            hint="Pass the child's parameters by name, e.g. {'order_id': order_id}",
            **recorder.where(),
        )
    op = recorder.op("start_step")
    recorded = recorder.match(op, f"start_step({step_id!r})", ev.ChildStarted, None)
    if isinstance(recorded, ev.ChildStarted):
        if recorded.step_id != step_id:
            raise recorder.mismatch(f"start_step({step_id!r})", recorded)
        return ChildHandle(
            recorder, recorded.child_execution_id, step_id, optional=recorded.optional
        )
    recorder.check_lease(f"start_step({step_id!r})")
    runtime = recorder.runtime
    child_id = child_execution_id(aggregate.execution_id, op)
    assert runtime.start_child is not None
    lineage = Lineage(
        parent_step_id=aggregate.step_id,
        parent_execution_id=aggregate.execution_id,
        root_execution_id=aggregate.root_execution_id or aggregate.execution_id,
        flow_id=aggregate.flow_id,
        node=node,
        optional=optional,
        config=config,
        dependencies=dependencies,
    )
    is_optional = await runtime.start_child(
        lineage,
        step_id=step_id,
        input=dict(input or {}),
        execution_id=uuid.UUID(child_id),
        correlation_id=aggregate.correlation_id,
    )
    aggregate.start_child(
        child_id, step_id, node=node, optional=is_optional, timestamp=recorder.now(), op=op
    )
    await recorder.commit()
    return ChildHandle(recorder, child_id, step_id, optional=is_optional)


async def child_outcome(recorder: Recorder, child_id: str) -> JSONObject | None:
    """The child's outcome from its own log, or None while it runs."""
    store = recorder.runtime.store
    last = await store.backend.stream_version(child_id)
    if last == 0:
        return None
    [event] = await store.events(child_id, last, last)
    if not isinstance(event, _TERMINAL):
        return None
    outcome: JSONObject = {
        "execution_id": child_id,
        "step_id": str(recorder.aggregate.children.get(child_id, {}).get("step_id", "")),
    }
    if isinstance(event, ev.StepCompleted):
        outcome.update(status="completed", result=copy.deepcopy(event.output), error=None)
    elif isinstance(event, ev.StepFailed):
        outcome.update(status="failed", result=None, error=event.reason)
    else:
        outcome.update(status="cancelled", result=None, error=event.reason)
    return outcome


async def wait_children(recorder: Recorder, child_ids: Sequence[str]) -> JSONObject:
    """Wait (durably) until one of the children ends; its outcome, recorded in the parent.

    Children are checked in the given order, so which one is reported first is decided
    once, live, and then read from the record on every replay.
    """
    op = recorder.op("wait_for_child")
    name = ",".join(child_ids)
    recorded = recorder.match(op, f"wait for child {name}", ev.EventAwaited, None)
    if recorded is None:
        recorder.aggregate.await_event(name, "child", None, timestamp=recorder.now(), op=op)
        await recorder.commit()

    async def ended() -> Outcome:
        for child_id in child_ids:
            outcome = await child_outcome(recorder, child_id)
            if outcome is not None:
                return (ev.WaitSatisfied, {"received_version": None, "value": outcome})
        return None

    recheck = recorder.runtime.clock.now_ms() + CHILD_RECHECK_MS
    result = await wait(
        recorder, op, f"children {name}", ended, recheck, timeout=False, kind="child"
    )
    assert isinstance(result, ev.WaitSatisfied)
    value = result.value
    assert isinstance(value, dict)
    return value
