"""Parked executions: an open attempt that cannot resume waits, unchanged, for a release.

When a worker finds that it cannot resume an execution's open attempt (its handler diverges
from the record: NonDeterminismError; or its version cannot resume the attempt), it records
one StepParked with the reason and takes the execution out of the queue's due order (due
never): no worker leases it again on its own (a message wakes it: the same handler records
its lease, diverges again and parks it again), and the lost-worker cutoff never counts it. A
worker whose handler differs from the one recorded in StepParked (another step version or
code hash) puts it back in the queue as it starts (:func:`release_for_other_handlers`);
:func:`release` (``engine.release(id)``, ``stepsource release ID``) does so on an operator's
word; a worker whose handler still diverges sets it aside again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.engine.clock import Clock, to_ms
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.failures import bounded_text
from stepsource.engine.runtime import Runtime
from stepsource.engine.store import ExecutionStore
from stepsource.errors import StepsourceError, UsageError
from stepsource.projections.summaries import ExecutionSummary

__all__ = ["NEVER_MS", "park", "release", "release_for_other_handlers"]

_logger = logging.getLogger("stepsource.worker")

#: parked executions listed per query when a worker looks for those it may resume
_PAGE = 500

#: the parked executions of a step, newest first, after a cursor (an execution id)
ListParked = Callable[[str, str | None, int], Awaitable[list[ExecutionSummary]]]

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
    version, code = ("", "") if definition is None else (definition.version, definition.code_hash)
    aggregate.park(bounded_text(reason, 4096), version, code, timestamp=now)
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


async def release_for_other_handlers(
    store: ExecutionStore,
    clock: Clock,
    definitions: Iterable[StepDefinition],
    parked: ListParked,
) -> list[str]:
    """Put back in the queue the parked executions of these steps that a handler other than
    this worker's parked (another step version or another ``code_hash``): this worker may be
    the fix. One that this worker's very handler parked stays parked. Return their ids."""
    released: list[str] = []
    for definition in definitions:
        mine = (definition.version, definition.code_hash)
        before = len(released)
        cursor: str | None = None
        while True:
            try:
                rows = await parked(definition.step_id, cursor, _PAGE)
            except StepsourceError as failure:  # no index now: an operator can still release
                _logger.warning("could not look for parked executions to resume: %s", failure)
                return released
            for row in rows:
                error = row.last_error or {}
                if (error.get("step_version"), error.get("code_hash")) == mine:
                    continue
                try:
                    await release(store, clock, row.execution_id)
                except StepsourceError:  # released, finished or damaged meanwhile
                    continue
                released.append(row.execution_id)
            if len(rows) < _PAGE:
                break
            cursor = rows[-1].execution_id
        if len(released) > before:
            _logger.info(
                "put %d parked execution(s) of step %r back in the queue: this worker's handler "
                "(version %s, code %s) differs from the one that parked them",
                len(released) - before,
                definition.step_id,
                definition.version,
                definition.code_hash,
            )
    return released
