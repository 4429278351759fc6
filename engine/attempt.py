"""Running one leased execution: the actor that alone writes its stream while it holds the lease.

``run_leased`` loads the execution, records the lease (and a new attempt, unless it resumes
one a lost worker left open), runs the handler with a StepContext and records the outcome:
StepCompleted, StepFailed, or AttemptFailed with a retry time. A version conflict means
another worker holds the execution now: the actor stops without writing anything more.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import anyio
import orjson

from stepsource.adapters.ports import Commit, Lease, Outgoing, QueueUpdate
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import Clock, to_ms
from stepsource.engine.context import StepContext
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.entropy import Entropy
from stepsource.engine.faults import kill_point
from stepsource.engine.leasing import lease_and_start, record_lease
from stepsource.engine.replay import ReplayCursor
from stepsource.engine.services import ServiceRegistry
from stepsource.engine.store import ExecutionStore
from stepsource.engine.waiting import Cancelled, Suspended
from stepsource.errors import (
    BackendUnavailableError,
    NonDeterminismError,
    StateValueError,
    StepFailedError,
    VersionConflictError,
)
from stepsource.projections.folds import replay

__all__ = ["Attempt", "Runtime", "run_leased"]

_logger = logging.getLogger("stepsource.worker")

#: a worker lost this many times in a row with the same attempt open fails the execution
MAX_LOST_WORKERS = 5

#: the due time of an execution that waits for a message only
NEVER_MS = 2**62

_E = TypeVar("_E", bound=BaseException)


@dataclass
class Runtime:
    """What an actor needs from its engine."""

    store: ExecutionStore
    definitions: dict[str, StepDefinition]
    services: ServiceRegistry
    clock: Clock
    worker_id: str
    lease_ms: int
    on_change: Callable[[str], None]
    entropy: Entropy = field(default_factory=Entropy)
    #: called with (execution id, ctx.do name) each time a sub-step body starts (testing)
    on_substep_body: Callable[[str, str], None] | None = None
    #: schedules a child execution (Engine._start_child); returns whether it is optional
    start_child: Callable[..., Awaitable[bool]] | None = None
    #: executions whose actor is giving its lease up itself (a suspension, an end, a retry, a
    #: release): the renewal loop must not take that for a lost lease
    giving_up: set[str] = field(default_factory=set)
    #: told (execution id, terminal event) once an actor's terminal commit is durable, so a
    #: handle waiting in this process returns without reading the log
    on_end: Callable[[str, ev.ExecutionEvent], None] | None = None


class Attempt:
    """The live state of one attempt: aggregate, replay cursor, and serialized commits."""

    def __init__(
        self,
        runtime: Runtime,
        definition: StepDefinition,
        aggregate: StepExecution,
        replay_cursor: ReplayCursor,
        applied: list[ev.ExecutionEvent],
    ) -> None:
        self.runtime = runtime
        self.definition = definition
        self.aggregate = aggregate
        self.replay = replay_cursor
        self._applied = replay_cursor.applied
        self._applied[:0] = applied
        self._lock = anyio.Lock(fast_acquire=True)  # uncontended on the hot path: no checkpoint
        self._durable_version = aggregate.version - len(aggregate.pending_events)
        self.services = runtime.services
        self.worker_id = runtime.worker_id

    @property
    def applied(self) -> list[ev.ExecutionEvent]:
        """Events folded into the aggregate so far (recorded or replayed), in order."""
        return self._applied

    def now(self) -> datetime:
        return self.runtime.clock.now()

    async def commit(
        self,
        *,
        final: bool = False,
        queue: QueueUpdate | None = None,
        consumed: Sequence[int] = (),
    ) -> None:
        """Make every pending event durable; return once this caller's events are."""
        target = self.aggregate.version
        try:
            self._lock.acquire_nowait()  # uncontended, the usual case: no checkpoint
        except anyio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._durable_version >= target:
                return
            outbox: list[Outgoing] = []
            if final:
                queue = QueueUpdate(kind="done")
                outbox = await terminal_outbox(self.runtime, self.aggregate)
            if queue is not None:
                self.runtime.giving_up.add(self.aggregate.execution_id)
            written = await self.runtime.store.commit(
                self.aggregate,
                queue=queue,
                lease_owner=self.runtime.worker_id,
                consumed=consumed,
                outbox=outbox,
            )
            self._applied.extend(written)
            self._durable_version = self.aggregate.version
        finally:
            self._lock.release()
        kill_point("after-record")
        if final:
            execution_id = self.aggregate.execution_id
            if self.runtime.on_end is not None and written and isinstance(written[-1], _ENDED):
                self.runtime.on_end(execution_id, written[-1])
            self.runtime.on_change(execution_id)


async def terminal_outbox(runtime: Runtime, aggregate: StepExecution) -> list[Outgoing]:
    """What a terminal commit posts in its own transaction: a nudge to the parent (which
    reads the child's outcome from the child's log) and, on cancellation, a cancel to every
    child still running."""
    now_ms = runtime.clock.now_ms()
    outbox: list[Outgoing] = []
    if aggregate.parent_execution_id:
        outbox.append(
            Outgoing(aggregate.parent_execution_id, "child", aggregate.execution_id, b"{}", now_ms)
        )
    if aggregate.status == "cancelled" and aggregate.children:
        reason = runtime.store.codec.seal(
            orjson.dumps({"reason": f"parent {aggregate.execution_id} was cancelled"})
        )
        store = runtime.store
        for child_id in aggregate.children:
            last = await store.backend.stream_version(child_id)
            if last and not isinstance((await store.events(child_id, last, last))[0], _ENDED):
                outbox.append(Outgoing(child_id, "cancel", "cancel", reason, now_ms))
    return outbox


_ENDED = (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)


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
            await _run_handler(Attempt(runtime, definition, aggregate, cursor, applied))
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
    aggregate, events = await store.load(lease.stream_id)
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
        attempt = Attempt(runtime, definition, aggregate, ReplayCursor(aggregate, ()), events)
        await _run_handler(attempt)
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
    start = aggregate.attempt_started_version
    base = replay(events[:start])
    assert base is not None
    base.limits = store.limits
    attempt = Attempt(runtime, definition, base, ReplayCursor(base, events[start:]), events[:start])
    await _run_handler(attempt)


def _find(error: BaseException, kind: type[_E]) -> _E | None:
    """``error`` itself or the first ``kind`` inside (nested) exception groups."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


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


async def _run_handler(attempt: Attempt) -> None:
    definition = attempt.definition
    aggregate = attempt.aggregate
    ctx = StepContext(attempt)
    try:
        try:
            validated = definition.validate_input(
                aggregate.input, execution_id=aggregate.execution_id
            )
            with anyio.fail_after(definition.timeout):
                output = await definition.handler(ctx, **definition.handler_kwargs(validated))
        except BaseExceptionGroup as group:
            # a task group inside the handler: what matters is the control flow inside it
            for kind in (Suspended, Cancelled, NonDeterminismError, VersionConflictError):
                found = _find(group, kind)
                if found is not None:
                    raise found from None
            raise
    except Suspended as suspended:
        await _suspend(attempt, suspended)
        return
    except Cancelled:
        return
    except StepFailedError:
        if not attempt.aggregate.is_terminal:  # raised by user code, not by ctx.fail()
            await _attempt_failed(attempt, StepFailedError("the handler raised StepFailedError"))
        return
    except (NonDeterminismError, VersionConflictError, BackendUnavailableError):
        raise  # not the handler's failure: the worker deals with them
    except Exception as error:  # noqa: BLE001 - a handler's own exception fails its attempt
        if attempt.aggregate.is_terminal:
            return
        await _attempt_failed(attempt, error)
        return
    await _finish(ctx, attempt, output)


async def _suspend(attempt: Attempt, suspended: Suspended) -> None:
    """Record the suspension and requeue the execution for its wake-up; give up the lease."""
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


async def _finish(ctx: StepContext, attempt: Attempt, output: Any) -> None:
    aggregate = attempt.aggregate
    if aggregate.is_terminal:
        return
    op = ctx.next_op("complete")
    leftover = attempt.replay.leftover()
    if leftover is not None and (leftover.scope, leftover.seq) != (op[1], op[2]):
        raise attempt.replay.mismatch("returning from the handler", leftover)
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


async def _attempt_failed(attempt: Attempt, error: BaseException) -> None:
    attempt.replay.finish_replay()
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
