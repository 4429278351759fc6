"""The actor: the one task that writes an execution's stream while it holds the lease.

``run_leased`` loads the execution, records the lease (and a new attempt, unless it resumes
one a lost worker left open), runs the handler through the runner (:mod:`.runner`) and
records the outcome: StepCompleted, StepFailed, or AttemptFailed with a retry time. A version
conflict means another worker holds the execution now: the actor stops without writing
anything more.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import anyio
import orjson

from stepsource.adapters.ports import Commit, Lease, QueueUpdate
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import to_ms
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.failures import bounded_text, failure_message
from stepsource.engine.faults import kill_point
from stepsource.engine.flowcontrol import admit, free_slot, hold_back
from stepsource.engine.interceptors import AttemptInfo, AttemptOutcome, hooked, intercept
from stepsource.engine.leasing import lease_and_start, record_lease
from stepsource.engine.parking import park
from stepsource.engine.quarantine import set_aside
from stepsource.engine.recorder import (
    HistoryNeeded,
    InterceptorFailed,
    Recorder,
    terminal_outbox,
)
from stepsource.engine.replay import ReplayCursor, ReplayEnd
from stepsource.engine.runner import run_handler
from stepsource.engine.runtime import Runtime
from stepsource.engine.waiting import Cancelled, Suspended
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    NonDeterminismError,
    OutputValidationError,
    StateValueError,
    StepFailedError,
    StepsourceError,
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
        await _run_leased(runtime, lease, started)
    finally:
        if runtime.held_slots:  # a flow-controlled run gives its concurrency slot back
            with anyio.CancelScope(shield=True):
                await free_slot(runtime, lease.stream_id)


async def _run_leased(
    runtime: Runtime,
    lease: Lease,
    started: tuple[StepExecution, list[ev.ExecutionEvent]] | None,
) -> None:
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
        # The attempt stays open and the execution parked (one StepParked, due never): an
        # operator's release after a fixed deployment resumes it
        runtime.giving_up.add(lease.stream_id)
        with suppress(BackendUnavailableError, VersionConflictError):
            await park(runtime, lease.stream_id, failure_message(error, 4096, lease.stream_id))
        _logger.error(
            "%s; the execution is parked until it is released (stepsource release ID)", error
        )
    except (UnknownEventError, CorruptLogError) as error:
        await set_aside(runtime, lease.stream_id, error)  # unreadable: quarantined, not retried
    except BackendUnavailableError as error:
        runtime.contact.failed(runtime.clock.now_ms())  # an outage, not a dead worker
        # nothing is lost: what was acknowledged is in the log; the execution resumes by
        # replay once the backend answers and the lease expires (or is released)
        _logger.warning(
            "the backend failed while running execution %s (%s); it resumes later",
            lease.stream_id,
            error,
        )
    except Exception as error:  # noqa: BLE001 - no execution takes the worker down
        # recording even the failure failed: the worker stays up, the execution is retried
        # after a lease period (and failed by the lost-worker cutoff if this repeats)
        _logger.error(
            "execution %s could not be run or its failure recorded (%s); retrying it later",
            lease.stream_id,
            failure_message(error, 4096, lease.stream_id),
        )
        runtime.giving_up.add(lease.stream_id)
        retry_at = runtime.clock.now_ms() + runtime.lease_ms
        with suppress(BackendUnavailableError, VersionConflictError):
            await runtime.store.backend.release(runtime.worker_id, lease.stream_id, due_ms=retry_at)


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
    limits = runtime.flow_limits.get(aggregate.step_id)
    unfit: StepsourceError | None = None
    if limits is not None:
        eid = aggregate.execution_id
        try:
            data = definition.input_with_defaults(aggregate.input, execution_id=eid)
            key = limits.key_of(data, eid)
        except StepsourceError as error:
            # no key for this input: the attempt fails with why, as the handler would with
            # an input that does not fit (it was released and leased again, for ever)
            unfit = error
        else:
            refused = await admit(runtime, limits, aggregate, key, new_attempt=not resuming)
            if refused is not None:  # no slot or no rate: back to the queue, holding no worker
                await hold_back(runtime, aggregate, refused)
                return
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
        attempt = Recorder(runtime, definition, aggregate, cursor, events, history_from=first)
        attempt.unfit = unfit
        await _run_attempt(attempt)
        return
    taken_over = record_lease(runtime, aggregate, definition, now)
    if aggregate.leases_lost >= MAX_LOST_WORKERS:

        async def fail() -> None:
            aggregate.fail(
                f"the worker running this execution was lost {aggregate.leases_lost} times in "
                "a row",
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

        await _end_unrun(runtime, aggregate, fail)
        runtime.on_change(aggregate.execution_id)
        return
    events.extend(await store.commit(aggregate, lease_owner=runtime.worker_id))
    await _resume(runtime, aggregate, events, taken_over=taken_over, unfit=unfit)


async def _resume(
    runtime: Runtime,
    aggregate: StepExecution,
    events: list[ev.ExecutionEvent],
    *,
    taken_over: bool,
    unfit: StepsourceError | None = None,
) -> None:
    """Run the open attempt again from the top against its record (``unfit``: fail it with
    that instead). ``events`` are the last
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
    recorder = Recorder(
        runtime,
        definition,
        base,
        cursor,
        head,
        history_from=history_from,
        resumed=True,
        taken_over=taken_over,  # the StepLeased just recorded took over from a lost worker
    )
    recorder.unfit = unfit
    await _run_attempt(recorder)


async def _cancelled_in_inbox(runtime: Runtime, aggregate: StepExecution) -> bool:
    """Honour a cancellation posted while the execution waited, without running the handler."""
    items = await runtime.store.backend.inbox(aggregate.execution_id)
    cancels = [item for item in items if item.kind == "cancel"]
    if not cancels:
        return False
    plain = orjson.loads(runtime.store.codec.open(cancels[0].data))
    reason = str(plain.get("reason", "cancelled"))

    async def cancel() -> None:
        aggregate.cancel(reason, timestamp=runtime.clock.now())
        runtime.giving_up.add(aggregate.execution_id)
        await runtime.store.commit(
            aggregate,
            queue=QueueUpdate(kind="done"),
            lease_owner=runtime.worker_id,
            consumed=[item.id for item in cancels],
            outbox=await terminal_outbox(runtime, aggregate),
        )

    await _end_unrun(runtime, aggregate, cancel)
    runtime.on_change(aggregate.execution_id)
    return True


#: what the actor lets through to the worker: another worker holds the execution, it is
#: parked, or the backend is down (nothing of the handler's own)
_NOT_THE_HANDLERS = (NonDeterminismError, VersionConflictError, BackendUnavailableError)


async def _run_attempt(attempt: Recorder) -> None:
    """Run the handler and record how it ended, inside the engine's interceptors."""
    interceptors = hooked(attempt.runtime.interceptors, "attempt")
    if not interceptors:
        await _run_and_record(attempt)
        return
    info = _attempt_info(attempt.aggregate, attempt.definition, attempt.worker_id, attempt.resumed)
    await intercept(interceptors, "attempt", info, functools.partial(_run_and_record, attempt))


def _attempt_info(
    aggregate: StepExecution, definition: StepDefinition, worker_id: str, resumed: bool
) -> AttemptInfo:
    return AttemptInfo(
        execution_id=aggregate.execution_id,
        step_id=aggregate.step_id,
        step_version=definition.version,
        attempt=aggregate.attempt,
        flow_id=aggregate.flow_id,
        worker_id=worker_id,
        headers=dict(aggregate.headers),
        resumed=resumed,
        scheduled_ms=to_ms(aggregate.created_on),
        due_ms=aggregate.due_ms,
    )


async def _end_unrun(
    runtime: Runtime, aggregate: StepExecution, record: Callable[[], Awaitable[None]]
) -> None:
    """An end recorded without running the handler (a cancellation found in the inbox, the
    lost-worker cutoff), inside the attempt interceptors: traces and metrics see it end."""
    interceptors = hooked(runtime.interceptors, "attempt")
    if not interceptors:
        await record()
        return

    async def work() -> AttemptOutcome:
        await record()
        return AttemptOutcome(aggregate.status, 0.0)

    definition = runtime.definitions[aggregate.step_id]
    info = _attempt_info(aggregate, definition, runtime.worker_id, aggregate.attempt_open)
    await intercept(interceptors, "attempt", info, work)


async def _run_and_record(attempt: Recorder) -> AttemptOutcome:
    """Run the handler and record its outcome; the execution's status then. Whatever goes
    wrong while recording the outcome (an output over the limits, details of complete() over
    the limit, a context call from a child task found at the return) ends the attempt with a
    recorded failure naming it: the worker goes on serving the others."""
    run = await run_handler(attempt)
    replayed = attempt.replay.replay_seconds
    try:
        if isinstance(run.error, InterceptorFailed):
            raise run.error
        return await _record_run(attempt, run.error, run.output, replayed)
    except InterceptorFailed as failed:
        # a commit interceptor raised: not the handler's failure; nothing more is recorded,
        # the worker logs it and the execution runs again after a lease period
        raise failed.error from None


async def _record_run(
    attempt: Recorder, raised: BaseException | None, output: Any, replayed: float
) -> AttemptOutcome:
    """Record how the run ended (``raised``, or returned ``output``), within the error
    boundary of :func:`_run_and_record`."""
    try:
        status = await _record_outcome(attempt, raised, output)
    except _NOT_THE_HANDLERS:
        raise
    except Exception as error:  # noqa: BLE001 - the one error boundary of finishing a run
        _logger.warning(
            "recording the outcome of execution %s failed (%s); the attempt fails",
            attempt.execution_id,
            bounded_text(type(error).__name__, 200),
        )
        attempt.in_doubt = True  # what was buffered is dropped: read the log again
        await _attempt_failed(attempt, error)
        status = attempt.aggregate.status
    return AttemptOutcome(status, replayed)


async def _record_outcome(attempt: Recorder, error: BaseException | None, output: Any) -> str:
    if error is None:
        await _finish(attempt, output)
    elif isinstance(error, Suspended):
        await _suspend(attempt, error)
    elif isinstance(error, Cancelled):
        pass  # StepCancelled is recorded already
    elif isinstance(error, HistoryNeeded):
        # the handler reads ctx.history: run it again with every event of the execution,
        # inside this attempt's interceptors (one attempt, one span, counted once)
        again = await _with_every_event(attempt)
        return (await _run_and_record(again)).status
    elif isinstance(error, _NOT_THE_HANDLERS):
        raise error  # not the handler's failure: the worker deals with them
    elif isinstance(error, ReplayEnd):  # pragma: no cover - a live cursor never ends a replay
        raise error
    elif attempt.aggregate.is_terminal:
        pass  # ctx.fail() recorded the end, or the handler raised after it
    elif isinstance(error, StepFailedError):  # raised by user code, not by ctx.fail()
        await _attempt_failed(attempt, StepFailedError("the handler raised StepFailedError"))
    else:
        await _attempt_failed(attempt, error)
    return attempt.aggregate.status


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
    return Recorder(attempt.runtime, attempt.definition, base, cursor, events[:start], resumed=True)


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
    try:  # refused before anything is recorded: the value is walked before the event is built
        data = attempt.definition.validate_output(output, execution_id=aggregate.execution_id)
        aggregate.complete(data, timestamp=attempt.now(), op=op)
    except StateValueError as error:
        refused = OutputValidationError(error.reason, hint=error.hint, **attempt.where())
        message = failure_message(refused, aggregate.limits.max_payload_bytes, refused.execution_id)
        aggregate.fail(
            message, None, error_type="OutputValidationError", timestamp=attempt.now(), op=op
        )
    await attempt.commit(final=True)


async def _attempt_failed(attempt: Recorder, error: BaseException) -> None:
    attempt.replay.finish_replay()
    if attempt.in_doubt:  # a commit failed midway: record the failure on what the log holds
        await attempt.reload()
    aggregate = attempt.aggregate
    aggregate.withdraw_completion()  # raised after ctx.complete(): the attempt failed
    definition = attempt.definition
    now = attempt.now()
    failures = aggregate.failed_attempts + 1
    retry = failures <= aggregate.max_retries and definition.retry.is_retryable(error)
    retry_at = to_ms(now) + int(definition.retry.delay_seconds(failures) * 1000) if retry else None
    message = failure_message(error, aggregate.limits.max_payload_bytes, aggregate.execution_id)
    error_type = bounded_text(type(error).__name__, 200)
    aggregate.fail_attempt(
        timestamp=now, error_type=error_type, error_message=message, retry_at_ms=retry_at
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
        error_type=error_type,
        timestamp=now,
        op=(failures, "", -1, definition.version),
    )
    await attempt.commit(final=True)
