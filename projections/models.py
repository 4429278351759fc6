"""Read objects users receive: frozen, snake_case, rebuilt from events on demand.

Timestamps are timezone-aware UTC datetimes, except :class:`StepRecord` and its
:class:`ExecutionAttempt` entries, which use epoch milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stepsource.aggregates.values import JSON, JSONObject

__all__ = [
    "CheckpointInfo",
    "ExecutionAttempt",
    "ExecutionInfo",
    "ExecutionMetadata",
    "HistoryEntry",
    "StepMetadata",
    "StepRecord",
    "WorkflowState",
]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One entry of an execution's history: when, what kind, what it carried."""

    timestamp: datetime
    type: str
    details: JSONObject
    version: int
    """The event version the entry was projected from (usable as ``at_version``)."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint made by ``create_checkpoint``, with the state exactly as it was then."""

    id: str
    created_at: datetime
    metadata: JSONObject
    state: JSONObject
    cursor: JSON
    items_processed: int | None
    accumulated_results: JSON
    version: int


@dataclass(frozen=True, slots=True)
class ExecutionInfo:
    """``ctx.info``: which execution this is and who runs it."""

    step_id: str
    flow_id: str | None
    execution_id: str
    attempt_number: int
    correlation_id: str | None
    parent_id: str | None
    parent_execution_id: str | None
    worker_id: str | None
    priority: int


@dataclass(frozen=True, slots=True)
class StepMetadata:
    """``ctx.step_metadata``: the step definition's descriptive fields."""

    id: str
    version: str
    display_name: str | None
    description: str | None


@dataclass(frozen=True, slots=True)
class ExecutionMetadata:
    """``ctx.execution_metadata``: where the execution is in its lifecycle."""

    status: str
    started_at: datetime | None
    completed_at: datetime | None
    succeeded: bool | None


@dataclass(frozen=True, slots=True)
class ExecutionAttempt:
    """One attempt of a step; times in epoch milliseconds."""

    id: int
    scheduled: int
    polled: int | None
    start: int | None
    updated: int
    executor: str | None
    ref: str | None
    runs: int
    output: JSON
    #: how many of its runs took it over from a worker that was lost (``runs`` also counts
    #: the wake-ups after a wait or a parking)
    takeovers: int = 0


@dataclass(frozen=True, slots=True)
class StepRecord:
    """The persisted execution record, projected from the events."""

    id: str
    step_id: str
    step_version: str
    flow_id: str | None
    parent_id: str | None
    parent_execution_id: str | None
    correlation_id: str | None
    step_definition_snapshot: JSONObject
    input: JSONObject
    output: JSON
    status: str
    worker_id: str | None
    priority: int
    optional: bool
    start: int | None
    schedule: int
    updated: int
    executions: tuple[ExecutionAttempt, ...]
    retry_count: int
    max_retries: int
    error: JSONObject | None
    version: int
    #: the run this one continues (``ctx.continue_as_new``), and the run it continued as
    continued_from: str | None = None
    continued_as: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """The workflow state of a flow execution, projected from its events and its
    children's. ``node_states`` maps each node (or child step) to its status, output, error,
    execution id and ISO timestamps."""

    flow_id: str | None
    execution_id: str
    status: str
    input: JSONObject
    output: JSON
    error: str | None
    current_node_id: str | None
    current_node_state: JSONObject | None
    node_states: dict[str, JSONObject]
    checkpoints: tuple[CheckpointInfo, ...]
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
