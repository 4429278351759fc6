"""Continue-as-new: a run ends and hands its work to a fresh execution of the same step.

``await ctx.continue_as_new(input)`` lets a long-lived loop (a poller, a schedule, an entity
that lives for months) start over with an empty log, carrying only ``input``: no replay ever
reads an ever-growing history.

**Design on the log.** The runs of a chain are numbered from 1; run *n*'s id is derived from
the first run's id and *n* (:func:`run_id`), so it is the same in every process and every
replay. The successor is scheduled *first* (its StepScheduled names the predecessor in
``continued_from``, the first run in ``chain_root`` and its number in ``chain_run``), then the
predecessor records its terminal StepContinued naming the successor. A crash between the two
leaves the predecessor's attempt open: it resumes by replay, reaches ``continue_as_new``
again, finds the successor's stream already at version 1 (the log's own version check, as a
child start does) and records StepContinued. The successor is therefore never lost and never
started twice. The successor keeps the business key, correlation id and priority, so
``engine.executions(key=...)`` lists every run of the chain.

Handles follow the chain: ``result()`` of any run waits for the last run's outcome, and a
signal, event, update or query sent to a run that continued goes to the chain's last run.
A message that reached a run's inbox but not its log when it continued is moved to the
successor's inbox in the commit that ends the run; a client whose message landed in the
inbox of a run that had just ended re-sends it to the chain's last run (it is still in that
inbox, so it was not moved: it is delivered once).
Since run *n + 1* exists before run *n* ends, the last run is the highest-numbered run that
exists: :func:`latest_run` finds it in a number of reads logarithmic in the chain's length
(a doubling search, then a bisection), however long the loop has been running.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, NoReturn

from stepsource.adapters.ports import Outgoing
from stepsource.aggregates import events as ev
from stepsource.aggregates.values import to_json_object
from stepsource.engine.faults import kill_point
from stepsource.engine.recorder import Recorder
from stepsource.engine.scope import SCOPE
from stepsource.engine.store import ExecutionStore
from stepsource.errors import InputValidationError, UsageError

__all__ = ["CONTINUE_NAMESPACE", "ContinuedAsNew", "continue_as_new", "latest_run", "run_id"]

#: run n > 1 of a chain has a name-based UUID of the first run's id and n in this namespace
CONTINUE_NAMESPACE = uuid.UUID("b7d3c5a1-84e2-4f09-b6a7-2c1e9d3f5a88")


class ContinuedAsNew(Exception):
    """Unwinds the handler after ``ctx.continue_as_new`` recorded StepContinued. Do not
    catch it: the run has ended (anything recorded after it is refused)."""

    def __init__(self, execution_id: str, successor: str) -> None:
        self.execution_id = execution_id
        self.successor = successor
        super().__init__(f"execution {execution_id} continued as {successor}")


def run_id(root: str, run: int) -> str:
    """The id of run ``run`` (from 1) of the chain whose first run is ``root``."""
    return root if run == 1 else str(uuid.uuid5(CONTINUE_NAMESPACE, f"{root}/{run}"))


def _refuse(recorder: Recorder, message: str, hint: str) -> NoReturn:
    raise UsageError(f"continue_as_new refused: {message}", hint=hint, **recorder.where())


async def continue_as_new(recorder: Recorder, input: Mapping[str, Any] | None) -> NoReturn:
    """End this run and start its successor with ``input`` (see the module docstring)."""
    aggregate = recorder.aggregate
    where = recorder.where()
    scope = SCOPE.get()
    if scope:
        kind, _, seq = scope.partition("#")
        inside = (  # a message handler runs in a scope named after its message's version
            f"{'an' if kind == 'update' else 'a'} {kind} handler"
            if kind in ("signal", "update") and seq.isdigit()
            else f"ctx.do({scope!r})"
        )
        _refuse(
            recorder,
            f"called inside {inside}",
            "Call ctx.continue_as_new from the handler body, after the ctx.do or the message "
            "handler returned",
        )
    if aggregate.parent_execution_id is not None or aggregate.flow_id is not None:
        _refuse(
            recorder,
            "this execution is a child or a DAG flow, whose parent waits for this very run",
            "Continue as new in the top-level execution, or loop inside the child",
        )
    if aggregate.marked_complete:
        _refuse(
            recorder,
            "ctx.complete() was already called in this attempt",
            "Call either ctx.complete() or ctx.continue_as_new(), not both",
        )
    data = to_json_object(
        {} if input is None else input,
        what="continue_as_new input",
        limits=recorder.runtime.store.limits,
        **where,
    )
    try:
        recorder.definition.input_kwargs(data, execution_id=aggregate.execution_id)
    except InputValidationError as error:
        raise InputValidationError(
            f"continue_as_new input is not an input of this step: {error.reason}",
            hint="Pass the input the next run's handler takes (the step's parameters by "
            f"name): {error.hint}",
            **where,
        ) from None
    op = recorder.op("continue_as_new")
    recorded = recorder.match(op, "continue_as_new", ev.StepContinued, None)
    if isinstance(recorded, ev.StepContinued):
        raise ContinuedAsNew(aggregate.execution_id, recorded.successor)
    recorder.check_lease("continue_as_new")
    root = aggregate.chain_root or aggregate.execution_id
    number = aggregate.chain_run + 1
    successor = run_id(root, number)
    runtime = recorder.runtime
    assert runtime.start_child is not None
    # the successor first: a crash before StepContinued below resumes this run, which finds
    # the successor there already (idempotent on its derived id) and then records the end
    await runtime.start_child(
        None,
        step_id=aggregate.step_id,
        input=data,
        execution_id=uuid.UUID(successor),
        correlation_id=aggregate.correlation_id,
        priority=aggregate.priority,
        key=aggregate.business_key,
        continues=(aggregate.execution_id, root, number),
    )
    kill_point("after-successor")
    aggregate.continue_as_new(successor, data, timestamp=recorder.now(), op=op)
    # what clients sent this run and it did not take is handed to the successor, in the
    # commit that ends this run (a client that posts after it re-sends: see handle.py)
    items = await runtime.store.backend.inbox(aggregate.execution_id)
    now_ms = runtime.clock.now_ms()
    forward = [
        Outgoing(successor, item.kind, item.name, item.data, now_ms)
        for item in items
        if item.id > aggregate.last_inbox_id and item.kind != "child"
    ]
    await recorder.commit(final=True, consumed=[item.id for item in items], forward=forward)
    raise ContinuedAsNew(aggregate.execution_id, successor)


async def latest_run(store: ExecutionStore, execution_id: str) -> str:
    """The last run of the chain ``execution_id`` belongs to: itself unless it continued."""
    backend = store.backend
    first = await store.events(execution_id, 1, 1)
    if not first or not isinstance(first[0], ev.StepScheduled):
        return execution_id  # no such execution: the caller reports it
    root = first[0].chain_root or execution_id
    known = first[0].chain_run

    async def exists(run: int) -> bool:
        return await backend.stream_version(run_id(root, run)) > 0

    step = 1  # runs are created in order and never skipped: double, then bisect
    while await exists(known + step):
        known += step
        step *= 2
    missing = known + step
    while missing - known > 1:
        middle = (known + missing) // 2
        if await exists(middle):
            known = middle
        else:
            missing = middle
    return run_id(root, known)
