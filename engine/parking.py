"""Parked executions: an open attempt that cannot resume waits, unchanged, for a release.

When a worker finds that it cannot resume an execution's open attempt (its handler diverges
from the record: NonDeterminismError; or its version cannot resume the attempt), it records
one StepParked with the reason and takes the execution out of the queue's due order (due
never): no worker leases it again on its own, nothing more is appended while it waits, and
the lost-worker cutoff never counts it. :func:`release` (``engine.release(id)``,
``stepsource release ID``) puts it back in the queue, due now, once a fixed handler is
deployed; a worker whose handler still diverges parks it again (one StepLeased and one
StepParked per release).
"""

from __future__ import annotations

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.engine.clock import Clock, to_ms
from stepsource.engine.failures import bounded_text
from stepsource.engine.runtime import Runtime
from stepsource.engine.store import ExecutionStore
from stepsource.errors import UsageError

__all__ = ["NEVER_MS", "park", "release"]

#: the due time of an execution no worker leases on its own
NEVER_MS = 2**62


async def park(runtime: Runtime, execution_id: str, reason: str) -> None:
    """Record StepParked on the execution (as the log holds it) and take it out of the
    queue's due order, giving up this worker's lease."""
    store = runtime.store
    aggregate, _ = await store.load(execution_id, with_events=False)
    if aggregate.is_terminal:
        return
    now = runtime.clock.now()
    # "enqueue", not "suspend": a suspension is due at once while the inbox holds items (the
    # message that woke the execution is still there), and a parked execution must not be
    # leased again until a release or a new message
    queue = QueueUpdate(
        kind="enqueue",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=NEVER_MS,
        now_ms=to_ms(now),
    )
    if aggregate.parked is not None:  # parked already (and released): just out of the queue
        await store.backend.append(
            Commit(
                stream_id=aggregate.execution_id,
                expected_version=aggregate.version,
                events=(),
                queue=queue,
                lease_owner=runtime.worker_id,
            )
        )
        return
    definition = runtime.definitions.get(aggregate.step_id)
    version = definition.version if definition is not None else ""
    aggregate.park(bounded_text(reason, 4096), version, timestamp=now)
    await store.commit(aggregate, queue=queue, lease_owner=runtime.worker_id)


async def release(store: ExecutionStore, clock: Clock, execution_id: str) -> None:
    """Put a parked execution back in the queue, due now (UsageError if it is not parked)."""
    aggregate, _ = await store.load(execution_id, with_events=False)
    if aggregate.parked is None or aggregate.is_terminal:
        raise UsageError(
            "the execution is not parked",
            execution_id=aggregate.execution_id,
            step_id=aggregate.step_id,
            hint="Only an execution whose history ends in 'parked' waits for a release",
        )
    queue = QueueUpdate(
        kind="enqueue",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=clock.now_ms(),
    )
    await store.backend.append(
        Commit(
            stream_id=aggregate.execution_id,
            expected_version=aggregate.version,
            events=(),
            queue=queue,
        )
    )
