"""The WorkflowState fold: a flow's own events plus the records of its children."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject
from stepsource.projections.folds import checkpoints_of, replay
from stepsource.projections.models import StepRecord, WorkflowState

__all__ = ["children_of", "workflow_state"]


def children_of(events: Sequence[ev.ExecutionEvent]) -> list[tuple[str, str]]:
    """(node key, child execution id) for every child the flow started, in start order."""
    seen: dict[str, int] = {}
    out: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, ev.ChildStarted):
            key = event.node
            if key is None:
                seen[event.step_id] = seen.get(event.step_id, 0) + 1
                key = f"{event.step_id}#{seen[event.step_id]}"
            out.append((key, event.child_execution_id))
    return out


def _iso(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat()


def workflow_state(
    events: Sequence[ev.ExecutionEvent], children: Mapping[str, StepRecord]
) -> WorkflowState:
    """Fold a flow's events and its children's records into the flow's WorkflowState."""
    aggregate = replay(events)
    assert aggregate is not None
    node_states: dict[str, JSONObject] = {}
    current: str | None = None
    for key, child_id in children_of(events):
        record = children.get(child_id)
        status = record.status if record else "scheduled"
        error = record.error.get("message") if record and record.error else None
        node_states[key] = {
            "execution_id": child_id,
            "step_id": record.step_id if record else None,
            "status": status,
            "output": copy.deepcopy(record.output) if record else None,
            "error": error,
            "started_at": _iso(record.start) if record else None,
            "completed_at": _iso(record.updated) if record and status in _ENDED else None,
        }
        if status not in _ENDED:
            current = key
    error_text = None
    if aggregate.status in ("failed", "cancelled") and aggregate.last_error:
        error_text = str(aggregate.last_error.get("message"))
    return WorkflowState(
        flow_id=aggregate.flow_id,
        execution_id=aggregate.execution_id,
        status=aggregate.status,
        input=copy.deepcopy(aggregate.input),
        output=copy.deepcopy(aggregate.output),
        error=error_text,
        current_node_id=current,
        current_node_state=copy.deepcopy(node_states[current]) if current else None,
        node_states=node_states,
        checkpoints=tuple(checkpoints_of(aggregate)),
        created_at=events[0].timestamp,
        started_at=aggregate.started_at,
        completed_at=aggregate.completed_at,
    )


_ENDED = frozenset({"completed", "failed", "cancelled"})
