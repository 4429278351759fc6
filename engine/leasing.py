"""Recording a worker's lease (and a new attempt) on an execution about to run.

Shared by the actor that leased an execution from the queue (:mod:`.actor`) and by a local
start (:mod:`.starting`), so both write the same events.
"""

from __future__ import annotations

from datetime import datetime

from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import to_ms
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.outages import excuse_outage, last_event_ms
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
) -> bool:
    """Record this worker's lease (not yet committed); whether it takes over an attempt a
    lost worker left running. A takeover that followed a backend outage this worker saw is
    recorded as such and does not count toward the lost-worker cutoff (:mod:`.outages`)."""
    # its worker was lost (a suspended or parked attempt was left by nobody)
    taken_over = aggregate.attempt_open and not aggregate.suspended and aggregate.parked is None
    if taken_over:
        log_takeover(aggregate, runtime.worker_id)
    since_ms = last_event_ms(aggregate)
    aggregate.lease(
        timestamp=now,
        worker_id=runtime.worker_id,
        executor=f"stepsource/{definition.step_id}@{definition.version}",
        lease_expires_ms=to_ms(now) + runtime.lease_ms,
    )
    if taken_over:
        excuse_outage(runtime.contact, aggregate, runtime.worker_id, since_ms)
    return taken_over
