"""Setting aside an execution whose log this code cannot read, and releasing it once fixed.

An execution with an event that does not decode (an unknown topic or newer class version, a
damaged row, another cipher key, a malformed stream id) is *quarantined*: the worker that
leased it gives the lease back with a due time no clock reaches (:data:`QUARANTINED_MS`),
logs the reason and goes on serving the others. Nothing is appended to the stream. The
executions index shows it as ``quarantined`` with the reason and the first unreadable
version (the index derives that from the log, so a rebuild derives it again).

A message posted to a quarantined execution wakes its queue row: the next worker to lease it
reads the log once more and, if it is still unreadable, sets it aside again (one read per
message, never a loop). :func:`release` makes it runnable again once the log reads (the
store restored, the newer release deployed, the right cipher key set).
"""

from __future__ import annotations

import logging

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.engine.runtime import Runtime
from stepsource.engine.store import ExecutionStore
from stepsource.errors import StepsourceError

__all__ = ["QUARANTINED_MS", "release", "set_aside"]

_logger = logging.getLogger("stepsource.worker")

#: the due time of a quarantined execution's queue row: later than any clock and any wait
QUARANTINED_MS = 2**62 + 1


async def set_aside(runtime: Runtime, stream_id: str, error: StepsourceError) -> None:
    """Give the lease back so that no worker leases the execution again by itself."""
    _logger.error(
        "execution %s is quarantined: %s; it is not run until it reads again "
        "(`stepsource quarantine release ID` once fixed)",
        str(stream_id)[:80],
        error,
    )
    runtime.giving_up.add(stream_id)
    await runtime.store.backend.release(runtime.worker_id, stream_id, due_ms=QUARANTINED_MS)


async def release(store: ExecutionStore, execution_id: str, now_ms: int) -> int:
    """Make a quarantined execution runnable again, if its whole log now reads (else the
    error that still stands is raised); return its version. A finished execution is only
    taken off the queue."""
    aggregate, _ = await store.load(execution_id)  # every event, decoded: raises if damaged
    queue = (
        QueueUpdate(kind="done")
        if aggregate.is_terminal
        else QueueUpdate(
            kind="enqueue",
            step_id=aggregate.step_id,
            priority=aggregate.priority,
            due_ms=now_ms,
        )
    )
    await store.backend.append(
        Commit(
            stream_id=aggregate.execution_id,
            expected_version=aggregate.version,
            events=(),
            queue=queue,
        )
    )
    return aggregate.version
