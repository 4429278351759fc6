"""A fold over the whole log in global order: one summary row per execution.

This is the pure part of the executions index: the read-model runner
(``stepsource.engine.readmodels``) applies it to each batch of the log it reads, and a rebuild
applies it to the whole log from the start; both give the same rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject

__all__ = ["ExecutionSummary", "summarize"]


@dataclass(frozen=True, slots=True)
class ExecutionSummary:
    """One row of the executions index: what ``engine.executions()`` and ``stepsource ls`` show.

    ``version`` is the execution's last event version folded in, ``events`` how many of its
    events were folded (always equal to ``version``: a row that counts an event twice would
    show it); ``attempt`` is the latest attempt number (0 before the first one starts).
    """

    execution_id: str
    step_id: str
    step_version: str
    flow_id: str | None
    parent_execution_id: str | None
    correlation_id: str | None
    priority: int
    status: str
    attempt: int
    worker_id: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    last_error: JSONObject | None
    version: int
    started_at: datetime | None = None
    events: int = 1


def summarize(summaries: dict[str, ExecutionSummary], event: ev.ExecutionEvent) -> None:
    """Fold one event into the summaries (keyed by execution id), in place."""
    eid = str(event.originator_id)
    if isinstance(event, ev.StepScheduled):
        summaries[eid] = ExecutionSummary(
            execution_id=eid,
            step_id=event.step_id,
            step_version=event.step_version,
            flow_id=event.flow_id,
            parent_execution_id=event.parent_execution_id,
            correlation_id=event.correlation_id,
            priority=event.priority,
            status="scheduled",
            attempt=0,
            worker_id=None,
            created_at=event.timestamp,
            updated_at=event.timestamp,
            completed_at=None,
            last_error=None,
            version=event.originator_version,
            started_at=None,
            events=1,
        )
        return
    current = summaries.get(eid)
    if current is None:
        return
    changes: dict[str, object] = {
        "updated_at": event.timestamp,
        "version": event.originator_version,
        "events": current.events + 1,
    }
    if isinstance(event, ev.StepLeased):
        changes["worker_id"] = event.worker_id
        if current.status == "waiting":
            changes["status"] = "executing"
    elif isinstance(event, ev.StepSuspended):
        changes["status"] = "waiting"
    elif isinstance(event, ev.StepStarted):
        changes.update(status="executing", attempt=event.attempt)
        if current.started_at is None:
            changes["started_at"] = event.timestamp
    elif isinstance(event, ev.AttemptFailed):
        error: JSONObject = {"type": event.error_type, "message": event.error_message}
        changes.update(last_error=error)
        if event.retry_at_ms is not None:
            changes["status"] = "retrying"
    elif isinstance(event, ev.StepCompleted):
        changes.update(status="completed", completed_at=event.timestamp)
    elif isinstance(event, ev.StepFailed):
        error = {"type": event.error_type, "message": event.reason}
        changes.update(status="failed", completed_at=event.timestamp, last_error=error)
    elif isinstance(event, ev.StepCancelled):
        error = {"type": "cancelled", "message": event.reason}
        changes.update(status="cancelled", completed_at=event.timestamp, last_error=error)
    summaries[eid] = dataclasses.replace(current, **changes)  # type: ignore[arg-type]
