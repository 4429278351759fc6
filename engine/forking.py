"""``engine.fork(execution_id, at_version)``: a new execution whose log starts as a prefix of
another's, then runs the current handler code on from there.

The events ``1..at_version`` of the source are copied, in one commit, into a new stream (each
re-made with the new execution id; its ``StepScheduled`` headers name the source and the
version), and the new execution is queued. A worker leases it like any other: if the prefix
ends inside an attempt, the handler runs again from the top and replays the recorded part of
that attempt (a divergence is a ``NonDeterminismError``, as on any resume), then goes on live;
if it ends between attempts, a new attempt starts. Children started in the prefix are the
source's: the fork waits for them, it does not start them again.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.aggregates import events as ev
from stepsource.aggregates.encoding import build_event
from stepsource.engine.clock import Clock
from stepsource.engine.store import ExecutionStore, check_version, parse_execution_id
from stepsource.errors import UsageError
from stepsource.projections.folds import replay

__all__ = ["FORKED_FROM", "fork_execution"]

#: the start header of a fork: ``<source execution id>@<version>``
FORKED_FROM = "stepsource-forked-from"


async def fork_execution(
    store: ExecutionStore,
    clock: Clock,
    execution_id: str,
    at_version: int,
    *,
    notify: Callable[[], None] | None = None,
) -> str:
    """Copy the source's events up to ``at_version`` into a new, queued execution; its id."""
    source = parse_execution_id(execution_id)
    check_version(at_version, source, needed=True)
    events = await store.events(source, 1, at_version)
    if len(events) < at_version:
        raise UsageError(
            f"the execution has {len(events)} events: there is no version {at_version} to fork "
            "from",
            execution_id=source,
            hint="Pick a version the execution has (stepsource events ID)",
        )
    first = events[0]
    assert isinstance(first, ev.StepScheduled)
    if isinstance(events[-1], (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)):
        raise UsageError(
            f"version {at_version} ends the execution: a fork from it would have nothing to run",
            execution_id=source,
            step_id=first.step_id,
            hint=f"Fork from an earlier version (at most {at_version - 1})",
        )
    fork_id = uuid.uuid4()
    copies: list[ev.ExecutionEvent] = []
    for event in events:
        values = dict(vars(event))
        values["originator_id"] = fork_id
        if isinstance(event, ev.StepScheduled):
            values["headers"] = {**(event.headers or {}), FORKED_FROM: f"{source}@{at_version}"}
        copies.append(build_event(type(event), values))
    aggregate = replay(copies)
    assert aggregate is not None
    encoded = store.codec.encode_many(copies, str(fork_id))
    queue = QueueUpdate(
        kind="enqueue",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=clock.now_ms(),
    )
    await store.backend.append(Commit(str(fork_id), 0, encoded, queue=queue))
    if notify is not None:
        notify()
    return str(fork_id)
