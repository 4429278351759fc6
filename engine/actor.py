"""The actor: the one task that writes an execution's stream while it holds the lease.

``run_leased`` loads the execution, records the lease (and a new attempt, unless it resumes
one a lost worker left open), runs the handler through the runner (:mod:`.runner`) and
records the outcome: StepCompleted, StepFailed, or AttemptFailed with a retry time. A version
conflict means another worker holds the execution now: the actor stops without writing
anything more.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import orjson

from stepsource.adapters.ports import Commit, Lease, QueueUpdate
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import to_ms
from stepsource.engine.faults import kill_point
from stepsource.engine.leasing import lease_and_start, record_lease
from stepsource.engine.quarantine import set_aside
from stepsource.engine.recorder import HistoryNeeded, Recorder, terminal_outbox
from stepsource.engine.replay import ReplayCursor, ReplayEnd
from stepsource.engine.runner import run_handler
from stepsource.engine.runtime import Runtime
from stepsource.engine.waiting import Cancelled, Suspended
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    NonDeterminismError,
    StateValueError,
    StepFailedError,
    UnknownEventError,
    VersionConflictError,
)
from stepsource.projections.folds import replay

__all__ = ["MAX_LOST_WORKERS", "NEVER_MS", "run_leased"]

_logger = logging.getLogger("stepsource.worker")

#: a worker lost this many times in a row with the same attempt open fails the execution
MAX_LOST_WORKERS = 5

#: the due time of an execution that waits for a message only
NEVER_MS = 2**62


async def run_leased(
    runtime: Runtime,
    lease: Lease,
    started: tuple[StepExecution, list[ev.ExecutionEvent]] | None = None,
) -> None:
    """Run the leased execution until it ends, fails an attempt, or the lease is lost.

    ``started`` is the aggregate and the events of an execution this worker scheduled,
    leased and started in one commit (a local start): it runs at once, with nothing to read.
    """
    try:
        if started is None:
            await _run(runtime, lease)
        else:
            aggregate, applied = started
            definition = runtime.definitions[aggregate.step_id]
            cursor = ReplayCursor(aggregate, ())
            await _run_attempt(Recorder(runtime, definition, aggregate, cursor, applied))
    except VersionConflictError:
        _logger.warning(
            "execution %s was taken over by another worker; this worker stops writing to it",
            lease.stream_id,
        )
    except NonDeterminismError as error:
        # The attempt stays open and the execution parked: a fixed deployment resumes it.
        _logger.error("%s; the execution is parked until a compatible handler runs it", error)
        retry_at = runtime.clock.now_ms() + runtime.lease_ms
        runtime.giving_up.add(lease.stream_id)
        await runtime.store.backend.release(runtime.worker_id, lease.stream_id, due_ms=retry_at)
    except (UnknownEventError, CorruptLogError) as error:
        await set_aside(runtime, lease.stream_id, error)  # unreadable: quarantined, not retried
    except BackendUnavailableError as error:
        # nothing is lost: what was acknowledged is in the log; the execution resumes by
        # replay once the backend answers and the lease expires (or is released)
        _logger.warning(
            "the backend failed while running execution %s (%s); it resumes later",
            lease.stream_id,
            error,
        )


async def _run(runtime: Runtime, lease: Lease) -> None:
    store = runtime.store
    # from the latest snapshot: the events before it are read only if the handler reads
    # ctx.history (HistoryNeeded)
    aggregate, events = await store.load(lease.stream_id, with_events=False)
    first = aggregate.version - len(events) + 1
    definition = runtime.definitions[aggregate.step_id]
    if aggregate.is_terminal:
        # the queue entry outlived the end (on NATS its removal follows the commit): remove it
        # now, or the finished execution would be leased again and again
        runtime.giving_up.add(lease.stream_id)
        await store.backend.append(
            Commit(
                stream_id=lease.stream_id,
                expected_version=aggregate.version,
                events=(),
                queue=QueueUpdate(kind="done"),
                lease_owner=runtime.worker_id,
            )
        )
        return
    if await _cancelled_in_inbox(runtime, aggregate):
        return
    resuming = aggregate.attempt_open
    if resuming and not definition.can_resume(aggregate.attempt_step_version):
        raise NonDeterminismError(
            f"the open attempt was started by version {aggregate.attempt_step_version!r} of the "
            f"handler; this worker runs version {definition.version!r}",
            execution_id=aggregate.execution_id,
            step_id=aggregate.step_id,
            hint="Keep a worker of the old version running until its attempts end, or declare "
            f"@engine.step(..., compatible_with=({aggregate.attempt_step_version!r},)) if its "
            "operations replay unchanged",
        )
    kill_point("before-first-append")
    now = runtime.clock.now()
    if not resuming:
        lease_and_start(runtime, aggregate, definition, now)
        events.extend(await store.commit(aggregate, lease_owner=runtime.worker_id))
        cursor = ReplayCursor(aggregate, ())
        await _run_attempt(
            Recorder(runtime, definition, aggregate, cursor, events, history_from=first)
        )
        return
    record_lease(runtime, aggregate, definition, now)
    if aggregate.leases_lost >= MAX_LOST_WORKERS:
        aggregate.fail(
            f"the worker running this execution was lost {aggregate.leases_lost} times in a row",
            None,
            error_type="WorkerLost",
            timestamp=now,
            op=(aggregate.attempt, "", -1, definition.version),
        )
        runtime.giving_up.add(aggregate.execution_id)
        await store.commit(
            aggregate,
            queue=QueueUpdate(kind="done"),
            lease_owner=runtime.worker_id,
            outbox=await terminal_outbox(runtime, aggregate),
        )
        runtime.on_change(aggregate.execution_id)
        return
    events.extend(await store.commit(aggregate, lease_owner=runtime.worker_id))
    await _resume(runtime, aggregate, events)


async def _resume(
    runtime: Runtime, aggregate: StepExecution, events: list[ev.ExecutionEvent]
) -> None:
    """Run the open attempt again from the top against its record. ``events`` are the last
    events of the stream (after a snapshot); the aggregate as the attempt started comes from
    the snapshot taken then (or the newest at or below it), so only the attempt's own events
    are read, however many the attempts before it made."""
    store = runtime.store
    start = aggregate.attempt_started_version
    head: list[ev.ExecutionEvent] = []
    base = await store.attempt_start(aggregate.execution_id, start)
    if base is None:
        base, head = await store.load(aggregate.execution_id, at_version=start, with_events=False)
    tail = [e for e in events if e.originator_version > start]
    known = tail[0].originator_version if tail else aggregate.version + 1
    if known > start + 1:  # the snapshot of the latest state lies inside the attempt
        tail[:0] = await store.events(aggregate.execution_id, start + 1, known - 1)
    definition = runtime.definitions[aggregate.step_id]
    history_from = start - len(head) + 1
    cursor = ReplayCursor(base, tail)
    await _run_attempt(Recorder(runtime, definition, base, cursor, head, history_from=history_from))


async def _cancelled_in_inbox(runtime: Runtime, aggregate: StepExecution) -> bool:
    """Honour a cancellation posted while the execution waited, without running the handler."""
    items = await runtime.store.backend.inbox(aggregate.execution_id)
    cancels = [item for item in items if item.kind == "cancel"]
    if not cancels:
        return False
    plain = orjson.loads(runtime.store.codec.open(cancels[0].data))
    reason = str(plain.get("reason", "cancelled"))
    aggregate.cancel(reason, timestamp=runtime.clock.now())
    runtime.giving_up.add(aggregate.execution_id)
    await runtime.store.commit(
        aggregate,
        queue=QueueUpdate(kind="done"),
        lease_owner=runtime.worker_id,
        consumed=[item.id for item in cancels],
        outbox=await terminal_outbox(runtime, aggregate),
    )
    runtime.on_change(aggregate.execution_id)
    return True


async def _run_attempt(attempt: Recorder) -> None:
    """Run the handler and record how it ended."""
    run = await run_handler(attempt)
    error = run.error
    if error is None:
        await _finish(attempt, run.output)
    elif isinstance(error, Suspended):
        await _suspend(attempt, error)
    elif isinstance(error, Cancelled):
        return  # StepCancelled is recorded already
    elif isinstance(error, HistoryNeeded):
        # the handler reads ctx.history: run it again with every event of the execution
        aggregate, events = await attempt.runtime.store.load(attempt.execution_id)
        start = aggregate.attempt_started_version
        base = replay(events[:start])
        assert base is not None
        base.limits = attempt.runtime.store.limits
        cursor = ReplayCursor(base, events[start:])
        await _run_attempt(
            Recorder(attempt.runtime, attempt.definition, base, cursor, events[:start])
        )
    elif isinstance(error, (NonDeterminismError, VersionConflictError, BackendUnavailableError)):
        raise error  # not the handler's failure: the worker deals with them
    elif isinstance(error, ReplayEnd):  # pragma: no cover - a live cursor never ends a replay
        raise error
    elif attempt.aggregate.is_terminal:
        return  # ctx.fail() recorded the end, or the handler raised after it
    elif isinstance(error, StepFailedError):  # raised by user code, not by ctx.fail()
        await _attempt_failed(attempt, StepFailedError("the handler raised StepFailedError"))
    else:
        await _attempt_failed(attempt, error)


async def _with_every_event(attempt: Recorder) -> Recorder:
    """A run of the open attempt again, with every event of the execution read (the handler
    reads ctx.history); what the first run buffered is dropped and recorded again."""
    store = attempt.runtime.store
    aggregate, events = await store.load(attempt.execution_id)
    start = aggregate.attempt_started_version
    base = replay(events[:start])
    assert base is not None
    base.limits = store.limits
    cursor = ReplayCursor(base, events[start:])
    return Recorder(attempt.runtime, attempt.definition, base, cursor, events[:start])


async def _suspend(attempt: Recorder, suspended: Suspended) -> None:
    """Record the suspension and requeue the execution for its wake-up; give up the lease."""
    if attempt.in_doubt:
        await attempt.reload()
    aggregate = attempt.aggregate
    now = attempt.now()
    aggregate.suspend(suspended.reason, suspended.wake_at_ms, timestamp=now)
    queue = QueueUpdate(
        kind="suspend",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=NEVER_MS if suspended.wake_at_ms is None else suspended.wake_at_ms,
        now_ms=to_ms(now),
    )
    await attempt.commit(queue=queue)
    kill_point("inside-wait")
    attempt.runtime.on_change(aggregate.execution_id)


async def _finish(attempt: Recorder, output: Any) -> None:
    if attempt.in_doubt:  # the handler caught a refused commit and returned
        await attempt.reload()
    aggregate = attempt.aggregate
    if aggregate.is_terminal:
        return
    op = attempt.op("complete")
    leftover = attempt.replay.leftover()
    if leftover is not None and (leftover.scope, leftover.seq) != (op[1], op[2]):
        raise attempt.mismatch("returning from the handler", leftover)
    recorded = attempt.replay.match(op[1], op[2], "return", ev.StepCompleted, None)
    if recorded is not None:
        return
    try:
        data = attempt.definition.output_json(output, execution_id=aggregate.execution_id)
    except StateValueError as error:
        aggregate.fail(
            str(error), None, error_type="OutputValidationError", timestamp=attempt.now(), op=op
        )
    else:
        aggregate.complete(data, timestamp=attempt.now(), op=op)
    await attempt.commit(final=True)


async def _attempt_failed(attempt: Recorder, error: BaseException) -> None:
    attempt.replay.finish_replay()
    if attempt.in_doubt:  # a commit failed midway: record the failure on what the log holds
        await attempt.reload()
    aggregate = attempt.aggregate
    definition = attempt.definition
    now = attempt.now()
    failures = aggregate.failed_attempts + 1
    retry = failures <= aggregate.max_retries and definition.retry.is_retryable(error)
    retry_at = to_ms(now) + int(definition.retry.delay_seconds(failures) * 1000) if retry else None
    message = "".join(traceback.format_exception_only(type(error), error)).strip()
    aggregate.fail_attempt(
        timestamp=now, error_type=type(error).__name__, error_message=message, retry_at_ms=retry_at
    )
    if retry_at is not None:
        queue = QueueUpdate(
            kind="enqueue", step_id=aggregate.step_id, priority=aggregate.priority, due_ms=retry_at
        )
        attempt.runtime.giving_up.add(aggregate.execution_id)
        await attempt.runtime.store.commit(aggregate, queue=queue, lease_owner=attempt.worker_id)
        attempt.runtime.on_change(aggregate.execution_id)
        return
    aggregate.fail(
        message,
        None,
        error_type=type(error).__name__,
        timestamp=now,
        op=(failures, "", -1, definition.version),
    )
    await attempt.commit(final=True)
