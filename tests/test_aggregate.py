"""The StepExecution aggregate on its own: pure decisions, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

import stepsource as ss
from stepsource.aggregates.execution import StepExecution
from stepsource.projections.folds import record_of

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def started() -> StepExecution:
    aggregate = StepExecution.schedule(
        execution_id=uuid.uuid4(),
        timestamp=NOW,
        step_id="s",
        step_version="1",
        definition={},
        input={},
        config={},
    )
    aggregate.lease(timestamp=NOW, worker_id="w0", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=NOW, worker_id="w0", step_version="1")
    return aggregate


def takeover(aggregate: StepExecution, worker: str) -> None:
    aggregate.lease(timestamp=NOW, worker_id=worker, executor="e", lease_expires_ms=0)


def test_workers_lost_in_a_row_count_only_without_progress_in_between() -> None:
    aggregate = started()
    for n in range(4):
        takeover(aggregate, f"w{n + 1}")
    assert aggregate.leases_lost == 4
    aggregate.set_state("progress", 1, timestamp=NOW, op=(1, "", 0, "1"))
    assert aggregate.leases_lost == 0  # the execution moved on: a new row starts
    for n in range(5):
        takeover(aggregate, f"v{n}")
    assert aggregate.leases_lost == 5  # five in a row: the runtime fails it (WorkerLost)


def test_a_suspension_is_not_a_lost_worker() -> None:
    aggregate = started()
    aggregate.suspend("sleep", 10, timestamp=NOW)
    takeover(aggregate, "w1")
    assert aggregate.leases_lost == 0
    assert aggregate.status == "executing"


def test_the_record_counts_takeovers_apart_from_wake_ups() -> None:
    """An attempt's runs count every lease of it; the UI badged any attempt run more than
    once "taken over", so each execution woken after a sleep was shown taken over."""
    woken = started()
    woken.suspend("sleep", 10, timestamp=NOW)
    takeover(woken, "w1")  # the wake-up
    lost = started()
    takeover(lost, "w1")
    takeover(lost, "w2")
    (attempt,) = record_of(list(woken.collect_events())).executions
    assert (attempt.runs, attempt.takeovers) == (2, 0)
    (attempt,) = record_of(list(lost.collect_events())).executions
    assert (attempt.runs, attempt.takeovers) == (3, 2)


def test_refused_commands_trigger_nothing() -> None:
    aggregate = started()
    before = aggregate.version
    with pytest.raises(ss.StateValueError):
        aggregate.set_state("k", {1, 2}, timestamp=NOW, op=(1, "", 0, "1"))
    with pytest.raises(ss.UnknownCheckpointError):
        aggregate.restore_checkpoint("nope", timestamp=NOW, op=(1, "", 0, "1"))
    aggregate.complete("done", timestamp=NOW, op=(1, "", 0, "1"))
    with pytest.raises(ss.UsageError, match="already completed"):
        aggregate.set_state("k", 1, timestamp=NOW, op=(1, "", 1, "1"))
    assert aggregate.version == before + 1  # only StepCompleted
