"""Recording a worker's lease (and a new attempt) on an execution about to run.

Shared by the actor that leased an execution from the queue (:mod:`.actor`) and by a local
start (:mod:`.starting`), so both write the same events.
"""

from __future__ import annotations

from datetime import datetime

from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import to_ms
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.runtime import Runtime
from stepsource.engine.worklog import log_takeover

__all__ = ["lease_and_start", "record_lease"]


def lease_and_start(
    runtime: Runtime, aggregate: StepExecution, definition: StepDefinition, now: datetime
) -> None:
    """Record this worker's lease and a new attempt on the aggregate (not yet committed)."""
    record_lease(runtime, aggregate, definition, now)
    aggregate.start_attempt(
        timestamp=now, worker_id=runtime.worker_id, step_version=definition.version
    )


def record_lease(
    runtime: Runtime, aggregate: StepExecution, definition: StepDefinition, now: datetime
) -> None:
    if aggregate.attempt_open and not aggregate.suspended:  # its worker was lost
        log_takeover(aggregate, runtime.worker_id)
    aggregate.lease(
        timestamp=now,
        worker_id=runtime.worker_id,
        executor=f"stepsource/{definition.step_id}@{definition.version}",
        lease_expires_ms=to_ms(now) + runtime.lease_ms,
    )
