"""Handing over the executions a stopping worker was running.

On shutdown (SIGTERM, the end of ``async with engine``) a worker's in-flight handlers are
cancelled. Each open attempt is then recorded as suspended (``the worker stopped``) with its
queue row due at once and no lease, in one commit guarded by this worker's lease: the next
worker resumes it by replay, and the stop is not counted as a lost worker (a lease counts the
previous holder as lost only for an attempt that was not suspended). A plain release wrote
nothing, so five rolling restarts while one long step ran failed it at the lost-worker
cutoff, although no worker was lost.

Where the record cannot be written (the lease is gone, the backend does not answer, or it
takes longer than :data:`HANDOVER_SECONDS`) the lease is released as before, or expires.
"""

from __future__ import annotations

from contextlib import suppress

import anyio

from stepsource.adapters.ports import QueueUpdate
from stepsource.engine.clock import to_ms
from stepsource.engine.runtime import Runtime
from stepsource.errors import BackendUnavailableError, StepsourceError

__all__ = ["HANDOVER_SECONDS", "STOPPED", "hand_over"]

#: the suspension reason a stopping worker records
STOPPED = "the worker stopped"
#: how long a stopping worker tries to record one hand-over before it just releases the lease
HANDOVER_SECONDS = 5.0


async def hand_over(runtime: Runtime, execution_id: str) -> None:
    """Record the stop and give the execution back to the queue (see the module docstring);
    shielded: a worker being cancelled still hands over."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(HANDOVER_SECONDS):
            with suppress(StepsourceError):  # lease gone, backend down, log unreadable
                if await _record_stop(runtime, execution_id):
                    return
        with suppress(BackendUnavailableError):
            await runtime.store.backend.release(runtime.worker_id, execution_id)


async def _record_stop(runtime: Runtime, execution_id: str) -> bool:
    """Append the suspension with the queue row due now; False when there is no open,
    running attempt to hand over (ended, parked, suspended already)."""
    store = runtime.store
    aggregate, _ = await store.load(execution_id, with_events=False)
    if (
        aggregate.is_terminal
        or not aggregate.attempt_open
        or aggregate.suspended
        or aggregate.parked is not None
    ):
        return False
    now = runtime.clock.now()
    now_ms = to_ms(now)
    aggregate.suspend(STOPPED, now_ms, timestamp=now)
    queue = QueueUpdate(
        kind="enqueue",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=now_ms,
        now_ms=now_ms,
    )
    await store.commit(aggregate, queue=queue, lease_owner=runtime.worker_id)
    return True
