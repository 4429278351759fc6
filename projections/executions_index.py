"""The executions index as rows: column shapes and the batch fold, without any I/O.

The runner in ``stepsource.engine.readmodels`` stores these rows in a local SQLite database
beside the log; this module says what a row holds and how a batch of events (with their
global positions) changes a set of rows. Times are stored as integer microseconds since the
epoch (UTC), so rows compare and sort exactly and serialize the same on every machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject
from stepsource.projections.summaries import (
    ExecutionSummary,
    Row,
    Touched,
    Unreadable,
    as_row,
    fold_into,
    new_row,
    unreadable_row,
)

__all__ = [
    "COLUMNS",
    "INDEX_VERSION",
    "STATUSES",
    "IndexFilter",
    "IndexedExecution",
    "fold",
    "from_micros",
    "from_row",
    "summary_json",
    "to_micros",
    "to_row",
]

#: the shape of the index's rows: an index stored with another version is dropped and
#: folded again from the log (3: the "parked" status; 4: the business key)
INDEX_VERSION = 4

#: every status an execution can have, in lifecycle order
STATUSES = (
    "scheduled",
    "executing",
    "waiting",
    "throttled",
    "retrying",
    "completed",
    "failed",
    "cancelled",
    "parked",
    "quarantined",
)

#: the columns of one row, in storage order; ``position`` is the log position of the
#: execution's StepScheduled (its place in "newest first")
COLUMNS = (
    "execution_id",
    "position",
    "step_id",
    "step_version",
    "flow_id",
    "parent_execution_id",
    "correlation_id",
    "priority",
    "status",
    "attempt",
    "worker_id",
    "created_at",
    "started_at",
    "updated_at",
    "completed_at",
    "last_error",
    "version",
    "events",
    "key",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)

StoredRow = tuple[Any, ...]


def to_micros(moment: datetime) -> int:
    """Exact integer microseconds since the epoch of an aware datetime."""
    return (moment - _EPOCH) // _MICRO


@dataclass(frozen=True, slots=True)
class IndexFilter:
    """What a query of the index filters on, wherever the index is stored: columns equal to
    a value, and the earliest creation time."""

    status: str | None = None
    step_id: str | None = None
    flow_id: str | None = None
    key: str | None = None
    since: datetime | None = None

    def equals(self) -> dict[str, str]:
        pairs = (
            ("status", self.status),
            ("step_id", self.step_id),
            ("flow_id", self.flow_id),
            ("key", self.key),
        )
        return {column: value for column, value in pairs if value is not None}

    def at_least(self) -> dict[str, int]:
        return {} if self.since is None else {"created_at": to_micros(self.since)}


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _opt_micros(moment: datetime | None) -> int | None:
    return None if moment is None else to_micros(moment)


def _opt_datetime(micros: int | None) -> datetime | None:
    return None if micros is None else from_micros(micros)


@dataclass(frozen=True, slots=True)
class IndexedExecution:
    """A summary and the log position where its execution was scheduled."""

    position: int
    summary: ExecutionSummary


def to_row(item: IndexedExecution, *, redact_errors: bool = False) -> StoredRow:
    """The row of one execution. With ``redact_errors`` (an encrypted log), an error keeps
    its type; its message, which may hold user data, stays in the encrypted events."""
    s = item.summary
    last_error = s.last_error
    if last_error is not None and redact_errors:
        last_error = {"type": last_error.get("type"), "message": "(in the encrypted log)"}
    error = (
        None
        if last_error is None
        else orjson.dumps(last_error, option=orjson.OPT_SORT_KEYS).decode()
    )
    return (
        s.execution_id,
        item.position,
        s.step_id,
        s.step_version,
        s.flow_id,
        s.parent_execution_id,
        s.correlation_id,
        s.priority,
        s.status,
        s.attempt,
        s.worker_id,
        to_micros(s.created_at),
        _opt_micros(s.started_at),
        to_micros(s.updated_at),
        _opt_micros(s.completed_at),
        error,
        s.version,
        s.events,
        s.key,
    )


def from_row(row: StoredRow) -> IndexedExecution:
    values = dict(zip(COLUMNS, row, strict=True))
    error = values["last_error"]
    last_error: JSONObject | None = None if error is None else orjson.loads(error)
    summary = ExecutionSummary(
        execution_id=values["execution_id"],
        step_id=values["step_id"],
        step_version=values["step_version"],
        flow_id=values["flow_id"],
        parent_execution_id=values["parent_execution_id"],
        correlation_id=values["correlation_id"],
        priority=values["priority"],
        status=values["status"],
        attempt=values["attempt"],
        worker_id=values["worker_id"],
        created_at=from_micros(values["created_at"]),
        updated_at=from_micros(values["updated_at"]),
        completed_at=_opt_datetime(values["completed_at"]),
        last_error=last_error,
        version=values["version"],
        started_at=_opt_datetime(values["started_at"]),
        events=values["events"],
        key=values["key"],
    )
    return IndexedExecution(values["position"], summary)


def fold(
    rows: Mapping[str, IndexedExecution],
    batch: Iterable[tuple[int, ev.ExecutionEvent | Touched | Unreadable]],
) -> dict[str, IndexedExecution]:
    """The rows a batch of (position, event) pairs changes or creates, given the current rows
    of (at least) the executions the batch touches. Events of executions with no row and no
    StepScheduled in the batch are ignored (the log never holds them)."""
    work: dict[str, tuple[int, Row]] = {}
    for position, event in batch:
        eid = str(event.originator_id)
        if isinstance(event, ev.StepScheduled):
            work[eid] = (position, new_row(event))
            continue
        found = work.get(eid)
        if found is None:
            current = rows.get(eid)
            if current is None:
                first = unreadable_row(event) if isinstance(event, Unreadable) else None
                if first is not None and event.originator_version <= 1:  # 0: unknown
                    work[eid] = (position, first)
                continue
            found = work[eid] = (current.position, as_row(current.summary))
        fold_into(found[1], event)
    return {
        eid: IndexedExecution(position, ExecutionSummary(**row))
        for eid, (position, row) in work.items()
    }


def summary_json(summary: ExecutionSummary) -> dict[str, Any]:
    """A summary as plain JSON data (times as ISO 8601 strings), for ``--json`` output."""

    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "execution_id": summary.execution_id,
        "step_id": summary.step_id,
        "step_version": summary.step_version,
        "flow_id": summary.flow_id,
        "parent_execution_id": summary.parent_execution_id,
        "correlation_id": summary.correlation_id,
        "priority": summary.priority,
        "status": summary.status,
        "attempt": summary.attempt,
        "worker_id": summary.worker_id,
        "created_at": when(summary.created_at),
        "started_at": when(summary.started_at),
        "updated_at": when(summary.updated_at),
        "completed_at": when(summary.completed_at),
        "last_error": summary.last_error,
        "version": summary.version,
        "events": summary.events,
        "key": summary.key,
    }
