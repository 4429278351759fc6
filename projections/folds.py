"""Pure folds from an execution's events to what users read.

Each function takes the events of one execution in version order (as the log returns them)
and computes its answer without I/O; ``at_version`` (inclusive) cuts the fold for time travel.
State and checkpoints come from replaying the aggregate itself, so the write side and the
read side can never disagree about what an event means.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from eventsourcing.domain import OriginatorVersionError

from stepsource.aggregates import events as ev
from stepsource.aggregates.attempt_log import ms
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import JSONObject
from stepsource.projections.models import (
    CheckpointInfo,
    ExecutionAttempt,
    HistoryEntry,
    StepRecord,
)

__all__ = [
    "Passed",
    "checkpoints_of",
    "history_entry",
    "history_of",
    "record_from",
    "record_of",
    "replay",
    "state_of",
]


_E = TypeVar("_E", ev.ExecutionEvent, "ev.ExecutionEvent | Passed")


def _upto(events: Iterable[_E], at_version: int | None) -> Iterable[_E]:
    for event in events:
        if at_version is not None and event.originator_version > at_version:
            return
        yield event


class Passed:
    """A run of consecutive events whose ``apply`` does nothing (history entries, recorded
    values, timers started...), read for what folding them changes: the aggregate's version
    and time (the last event's), and, if any is a progress event, its count of leases lost
    in a row. Folding it is folding those events (``tests/test_codec_lean.py``); the codec
    makes these for loads that keep only the aggregate, without parsing the events whole.
    Fold it whole: ``originator_version`` is the run's last version."""

    __slots__ = ("first_version", "originator_version", "progress", "timestamp")

    #: the time of the run's last event: set by the maker once the run ends (a run's time
    #: is read from one event, not from each)
    timestamp: datetime

    def __init__(self, originator_version: int, progress: bool) -> None:
        self.first_version = originator_version
        self.originator_version = originator_version
        self.progress = progress

    def extend(self, originator_version: int, progress: bool) -> None:
        """Add the next event of the run (its version follows the run's last)."""
        self.originator_version = originator_version
        self.progress = self.progress or progress

    def mutate(self, aggregate: StepExecution | None) -> StepExecution:
        assert aggregate is not None  # never the first event (StepScheduled is not passed)
        next_version = aggregate.version + 1
        if self.first_version != next_version:
            raise OriginatorVersionError(self.first_version, next_version)
        aggregate.version = self.originator_version
        aggregate.modified_on = self.timestamp
        if self.progress:
            aggregate.leases_lost = 0
        return aggregate


def replay(
    events: Iterable[ev.ExecutionEvent | Passed],
    *,
    at_version: int | None = None,
    start: StepExecution | None = None,
) -> StepExecution | None:
    """Fold events into the aggregate (from ``start``, e.g. a snapshot), up to ``at_version``."""
    aggregate = start
    if at_version is None:  # the usual case, without the generator of _upto per event
        for event in events:
            aggregate = event.mutate(aggregate)
        return aggregate
    for event in _upto(events, at_version):
        aggregate = event.mutate(aggregate)
    return aggregate


def state_of(aggregate: StepExecution) -> JSONObject:
    """A deep copy of the aggregate's state dict."""
    return copy.deepcopy(aggregate.state)


def checkpoints_of(aggregate: StepExecution) -> list[CheckpointInfo]:
    """Every checkpoint ``create_checkpoint`` made, oldest first."""
    return [_checkpoint_info(raw) for raw in aggregate.checkpoints.values()]


def _checkpoint_info(raw: JSONObject) -> CheckpointInfo:
    created_at = raw["created_at"]
    assert isinstance(created_at, str)
    items = raw["items_processed"]
    version = raw["version"]
    metadata, state = raw["metadata"], raw["state"]
    assert isinstance(metadata, dict)
    assert isinstance(state, dict)
    assert isinstance(version, int)
    assert items is None or isinstance(items, int)
    return CheckpointInfo(
        id=str(raw["id"]),
        created_at=datetime.fromisoformat(created_at),
        metadata=copy.deepcopy(metadata),
        state=copy.deepcopy(state),
        cursor=copy.deepcopy(raw["cursor"]),
        items_processed=items,
        accumulated_results=copy.deepcopy(raw["accumulated_results"]),
        version=version,
    )


def history_entry(event: ev.ExecutionEvent) -> HistoryEntry | None:
    """The history entry one event projects to (None for bookkeeping events)."""
    kind_details = event.history()
    if kind_details is None:
        return None
    kind, details = kind_details
    return HistoryEntry(
        timestamp=event.timestamp,
        type=kind,
        details=copy.deepcopy(details),
        version=event.originator_version,
    )


def history_of(
    events: Iterable[ev.ExecutionEvent], *, at_version: int | None = None
) -> list[HistoryEntry]:
    """The execution's history entries in the order their events were recorded."""
    entries = (history_entry(event) for event in _upto(events, at_version))
    return [entry for entry in entries if entry is not None]


def record_of(events: Sequence[ev.ExecutionEvent], *, at_version: int | None = None) -> StepRecord:
    """The persisted execution record, with one entry per attempt in ``executions``."""
    events = list(_upto(events, at_version))
    if not events or not isinstance(events[0], ev.StepScheduled):
        raise ValueError("an execution's events start with StepScheduled")
    aggregate = replay(events)
    assert aggregate is not None
    return record_from(aggregate)


def record_from(aggregate: StepExecution) -> StepRecord:
    """The execution record of the aggregate (folded from its events or from a snapshot and
    the events after it: its attempt log carries the attempts)."""
    log: dict[str, Any] = aggregate.attempt_log
    updated = ms(aggregate.modified_on)
    executions = tuple(
        ExecutionAttempt(
            id=a["id"],
            scheduled=a["scheduled"],
            polled=a["polled"],
            start=a["start"],
            # the attempt being run was last updated by the latest event
            updated=updated if a["id"] == log["current"] else a["updated"],
            executor=a.get("executor"),
            ref=a.get("ref"),
            runs=a["runs"],
            output=copy.deepcopy(a["output"]),
            takeovers=a.get("takeovers", 0),
        )
        for a in sorted(log["attempts"], key=lambda a: a["id"])
    )
    return StepRecord(
        id=aggregate.execution_id,
        step_id=aggregate.step_id,
        step_version=aggregate.step_version,
        flow_id=aggregate.flow_id,
        parent_id=aggregate.parent_id,
        parent_execution_id=aggregate.parent_execution_id,
        correlation_id=aggregate.correlation_id,
        step_definition_snapshot=copy.deepcopy(aggregate.definition),
        input=copy.deepcopy(aggregate.input),
        output=copy.deepcopy(aggregate.output),
        status=aggregate.status,
        worker_id=aggregate.worker_id,
        priority=aggregate.priority,
        optional=aggregate.optional,
        start=log["start"],
        schedule=ms(aggregate.created_on),
        updated=updated,
        executions=executions,
        # the failures that were retried: the last failure of a failed step is not a retry
        retry_count=log["retries"],
        max_retries=aggregate.max_retries,
        error=copy.deepcopy(aggregate.last_error),
        version=aggregate.version,
        continued_from=aggregate.continued_from,
        continued_as=aggregate.continued_as,
    )
