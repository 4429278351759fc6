"""A fold over the whole log in global order: one summary row per execution.

This is the pure part of the executions index: the read-model runner
(``stepsource.engine.readmodels``) applies it to each batch of the log it reads, and a rebuild
applies it to the whole log from the start; both give the same rows.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject

__all__ = [
    "INDEXED_EVENTS",
    "ExecutionSummary",
    "Row",
    "Touched",
    "Unreadable",
    "as_row",
    "fold_into",
    "new_row",
    "summarize",
    "unreadable_row",
]


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
    key: str | None = None
    """The business key it was started with (``engine.start(..., key=...)``), if any."""


QUARANTINED = "quarantined"
#: the status of an execution whose open attempt waits for a release (StepParked)
PARKED = "parked"
"""The status of an execution whose log holds an event this code cannot read."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An event that cannot be decoded (unknown topic or class version, damaged data, another
    cipher key): its execution is quarantined from this version on, with the reason."""

    originator_id: str
    originator_version: int
    reason: str


class Touched(NamedTuple):
    """Events whose content the index does not read: only which execution they belong to,
    the last one's version and time, and how many they are (the read-model runner reads
    just these from the stored bytes of such events, instead of decoding them whole, and
    makes one of a run of them that follow each other in the log). Folding it is folding
    each of its ``events`` in turn: the row takes the last one's version and time, and counts
    them all. A named tuple: a tuple is several times cheaper to make than a frozen
    dataclass."""

    originator_id: str
    originator_version: int
    timestamp: datetime
    events: int = 1


#: the events whose content changes a summary beyond its version and update time
INDEXED_EVENTS: tuple[type[ev.ExecutionEvent], ...] = (
    ev.StepScheduled,
    ev.StepLeased,
    ev.StepSuspended,
    ev.StepStarted,
    ev.AttemptFailed,
    ev.StepCompleted,
    ev.StepContinued,
    ev.StepFailed,
    ev.StepCancelled,
    ev.StepParked,
    ev.StepThrottled,
)

_FIELDS = tuple(f.name for f in dataclasses.fields(ExecutionSummary))

#: a summary in the mutable form folds work on (the fields of ExecutionSummary)
Row = dict[str, Any]


def new_row(event: ev.StepScheduled) -> Row:
    """The summary of an execution that was just scheduled."""
    return {
        "execution_id": str(event.originator_id),
        "step_id": event.step_id,
        "step_version": event.step_version,
        "flow_id": event.flow_id,
        "parent_execution_id": event.parent_execution_id,
        "correlation_id": event.correlation_id,
        "priority": event.priority,
        "status": "scheduled",
        "attempt": 0,
        "worker_id": None,
        "created_at": event.timestamp,
        "updated_at": event.timestamp,
        "completed_at": None,
        "last_error": None,
        "version": event.originator_version,
        "started_at": None,
        "key": event.key,
        "events": 1,
    }


def unreadable_row(event: Unreadable) -> Row | None:
    """The row of an execution whose very first event cannot be read (None if its stream id
    is not an execution id): listed as quarantined, with nothing else known of it."""
    try:
        execution_id = str(uuid.UUID(event.originator_id))
    except ValueError:
        return None
    never = datetime(1970, 1, 1, tzinfo=UTC)
    summary = ExecutionSummary(
        execution_id=execution_id,
        step_id="",
        step_version="",
        flow_id=None,
        parent_execution_id=None,
        correlation_id=None,
        priority=0,
        status="scheduled",
        attempt=0,
        worker_id=None,
        created_at=never,
        updated_at=never,
        completed_at=None,
        last_error=None,
        version=0,
        events=0,
        key=None,
    )
    row = as_row(summary)
    fold_into(row, event)
    return row


def fold_into(row: Row, event: ev.ExecutionEvent | Touched | Unreadable) -> None:
    """Fold one later event (not StepScheduled) of the row's execution into it, in place."""
    if row["status"] == QUARANTINED:
        return  # nothing after the first unreadable event is read
    if isinstance(event, Unreadable):
        row["status"] = QUARANTINED
        row["last_error"] = {
            "type": "quarantined",
            "message": event.reason,
            "version": event.originator_version,
        }
        return
    row["updated_at"] = event.timestamp
    row["version"] = event.originator_version
    if type(event) is Touched:  # exactly the tuple: an event class is never one
        row["events"] += event.events
        return
    row["events"] += 1
    if isinstance(event, ev.StepLeased):
        row["worker_id"] = event.worker_id
        if row["status"] in ("waiting", PARKED, "throttled"):
            row["status"] = "executing"
    elif isinstance(event, ev.StepParked):
        row["status"] = PARKED
        row["last_error"] = {
            "type": "parked",
            "message": event.reason,
            "step_version": event.step_version,
            "code_hash": event.code_hash,
        }
    elif isinstance(event, ev.StepSuspended):
        row["status"] = "waiting"
    elif isinstance(event, ev.StepThrottled):
        row["status"] = "throttled"
    elif isinstance(event, ev.StepStarted):
        row["status"] = "executing"
        row["attempt"] = event.attempt
        if row["started_at"] is None:
            row["started_at"] = event.timestamp
    elif isinstance(event, ev.AttemptFailed):
        row["last_error"] = {"type": event.error_type, "message": event.error_message}
        if event.retry_at_ms is not None:
            row["status"] = "retrying"
    elif isinstance(event, ev.StepCompleted):
        row["status"] = "completed"
        row["completed_at"] = event.timestamp
    elif isinstance(event, ev.StepFailed):
        row["status"] = "failed"
        row["completed_at"] = event.timestamp
        row["last_error"] = {"type": event.error_type, "message": event.reason}
    elif isinstance(event, ev.StepCancelled):
        row["status"] = "cancelled"
        row["completed_at"] = event.timestamp
        row["last_error"] = {"type": "cancelled", "message": event.reason}


def as_row(summary: ExecutionSummary) -> Row:
    return {name: getattr(summary, name) for name in _FIELDS}


def summarize(
    summaries: dict[str, ExecutionSummary], event: ev.ExecutionEvent | Touched | Unreadable
) -> None:
    """Fold one event into the summaries (keyed by execution id), in place."""
    eid = str(event.originator_id)
    if isinstance(event, ev.StepScheduled):
        summaries[eid] = ExecutionSummary(**new_row(event))
        return
    current = summaries.get(eid)
    if current is None:
        return
    row = as_row(current)
    fold_into(row, event)
    summaries[eid] = ExecutionSummary(**row)
