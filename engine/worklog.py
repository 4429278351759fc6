"""A worker's log lines about the executions it runs, on the ``stepsource.worker`` logger.

One INFO line per attempt that starts (the first one is the execution's start, later ones
are retries), per attempt that fails with a retry coming, per end (completed, failed,
cancelled) and per takeover of an attempt another worker left running. Each line names the
execution, the step and the worker in its text and carries them as record attributes
(``execution_id``, ``step_id``, ``attempt``, ``worker_id``, ``event``) for structured
handlers (``stepsource worker --log-format json`` prints them as JSON fields).

Lines are written once the commit that records them is durable (a takeover is written when
the new worker takes the lease, before it replays). Nothing is formatted unless the logger
is enabled for INFO, so a library user who configures no logging pays one level check per
commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution

__all__ = ["LOGGER_NAME", "log_commit", "log_takeover"]

LOGGER_NAME = "stepsource.worker"
_logger = logging.getLogger(LOGGER_NAME)


def _fields(aggregate: StepExecution, event: str, **more: Any) -> dict[str, Any]:
    return {
        "event": event,
        "execution_id": aggregate.execution_id,
        "step_id": aggregate.step_id,
        "attempt": aggregate.attempt,
        "worker_id": aggregate.worker_id,
        **more,
    }


def log_commit(aggregate: StepExecution, committed: Sequence[object]) -> None:
    """Log what a durable commit of ``aggregate``'s events means for the execution."""
    if not _logger.isEnabledFor(logging.INFO):
        return
    for event in committed:
        if isinstance(event, ev.StepStarted):
            _started(aggregate, event)
        elif isinstance(event, ev.AttemptFailed) and event.retry_at_ms is not None:
            delay = max(event.retry_at_ms - event.timestamp.timestamp() * 1000, 0) / 1000
            _logger.info(
                "execution %s (%s) attempt %d failed (%s); retry %d of %d in %.3g s",
                aggregate.execution_id,
                aggregate.step_id,
                event.attempt,
                event.error_message.splitlines()[-1] if event.error_message else event.error_type,
                event.attempt,
                aggregate.max_retries,
                delay,
                extra=_fields(aggregate, "retry", error_type=event.error_type),
            )
        elif isinstance(event, (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)):
            _ended(aggregate, event)


def _started(aggregate: StepExecution, event: ev.StepStarted) -> None:
    what = "started" if event.attempt == 1 else f"attempt {event.attempt} started (a retry)"
    _logger.info(
        "execution %s (%s@%s) %s on worker %s",
        aggregate.execution_id,
        aggregate.step_id,
        event.step_version,
        what,
        event.worker_id,
        extra=_fields(aggregate, "started" if event.attempt == 1 else "retry-started"),
    )


def _ended(aggregate: StepExecution, event: ev.ExecutionEvent) -> None:
    status = aggregate.status
    detail = ""
    if isinstance(event, ev.StepFailed):
        detail = f": {event.error_type}: {event.reason}"
    elif isinstance(event, ev.StepCancelled):
        detail = f": {event.reason}"
    _logger.info(
        "execution %s (%s) %s after %d attempt(s)%s",
        aggregate.execution_id,
        aggregate.step_id,
        status,
        aggregate.attempt,
        detail,
        extra=_fields(aggregate, status),
    )


def log_takeover(aggregate: StepExecution, worker_id: str) -> None:
    """Log that ``worker_id`` takes over the attempt ``aggregate``'s last worker left open
    (called before the new lease is recorded, while ``aggregate.worker_id`` is the old one)."""
    if not _logger.isEnabledFor(logging.INFO):
        return
    _logger.info(
        "execution %s (%s) attempt %d taken over by worker %s from worker %s (lost); "
        "it resumes by replay",
        aggregate.execution_id,
        aggregate.step_id,
        aggregate.attempt,
        worker_id,
        aggregate.worker_id,
        extra=_fields(
            aggregate, "takeover", worker_id=worker_id, previous_worker_id=aggregate.worker_id
        ),
    )
