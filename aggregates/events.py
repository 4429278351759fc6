"""The events of a step execution: what happened, each carrying all its projection needs.

Event classes are stored data. Each has an explicit, stable ``TOPIC`` (``stepsource:Name``)
registered with eventsourcing, so moving this module never changes the stored format, and a
``class_version`` so an old event read by new code is upcast (``upcast_v1_v2`` on the class).
``apply`` folds an event into a :class:`~stepsource.aggregates.execution.StepExecution`; it
never reads a clock, a random source or the network.

Times other than ``timestamp`` are epoch milliseconds (ints), so every field is plain JSON.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

from eventsourcing.domain import (
    AggregateCreated,
    AggregateEvent,
    OriginatorIDError,
    OriginatorVersionError,
)
from eventsourcing.utils import register_topic

from stepsource.aggregates.attempt_log import attempt_failed, attempt_leased, attempt_started
from stepsource.aggregates.values import JSON, JSONObject, copy_json

if TYPE_CHECKING:
    from stepsource.aggregates.execution import StepExecution

TOPIC_PREFIX = "stepsource:"


class ExecutionEvent(AggregateEvent):
    """Base of every StepExecution event."""

    TOPIC = "stepsource:ExecutionEvent"
    class_version = 1
    PROGRESS: ClassVar[bool] = False
    """Whether the event is progress of the attempt: workers lost before it no longer count
    as lost "in a row" (``leases_lost``)."""

    def mutate(self, aggregate: Any) -> Any:
        """The library's mutation of an existing aggregate, in one call with no property
        lookups, since replay folds thousands: the same checks and errors (the event must be
        the aggregate's and its next version), then ``apply``, then the aggregate takes the
        event's version and timestamp. Creation (:class:`StepScheduled`) keeps the library's.

        The aggregate's id, version and modification time are read and written through the
        library's public ``id``, ``version`` and ``modified_on`` properties.
        """
        assert aggregate is not None
        originator_id = self.originator_id
        aggregate_id = aggregate.id
        # the events of one read share their id object with the aggregate: skip UUID.__eq__
        if originator_id is not aggregate_id and originator_id != aggregate_id:
            raise OriginatorIDError(originator_id, aggregate_id)
        next_version = aggregate.version + 1
        if self.originator_version != next_version:
            raise OriginatorVersionError(self.originator_version, next_version)
        self.apply(aggregate)
        aggregate.version = self.originator_version
        aggregate.modified_on = self.timestamp
        if self.PROGRESS:
            aggregate.leases_lost = 0
        return aggregate

    def describe(self) -> str:
        """One line naming the operation that recorded this event, as a handler writes it
        (what a nondeterminism error or a replay report shows)."""
        return type(self).__name__

    def history(self) -> tuple[str, JSONObject] | None:
        """The history entry this event projects to, as ``(type, details)``; None for the
        bookkeeping events that make no entry."""
        return None


class Recorded(ExecutionEvent):
    """An event a handler's context operation recorded, with the coordinates replay matches.

    ``scope`` is the enclosing ``ctx.do`` name ("" for the handler body), ``seq`` the
    operation's ordinal within that scope in this ``attempt``, ``step_version`` the version
    of the handler code that recorded it.
    """

    TOPIC = "stepsource:Recorded"
    PROGRESS = True
    attempt: int
    scope: str
    seq: int
    step_version: str

    def identity(self) -> object:
        """What a re-run operation must name the same, besides its class and coordinates
        (a state key, a checkpoint id...), for the replay to match it; None if nothing."""
        return None


class StepScheduled(AggregateCreated, ExecutionEvent):
    """An execution is created. Version 2 adds ``headers``: string pairs the starter's
    interceptors passed along (a trace context), handed to every attempt; version 3 the
    business ``key`` it was started with (None without one)."""

    TOPIC = "stepsource:StepScheduled"
    class_version = 3
    step_id: str
    step_version: str
    definition: JSONObject
    input: JSONObject
    config: JSONObject
    dependencies: JSONObject
    flow_id: str | None
    root_execution_id: str | None
    parent_id: str | None
    parent_execution_id: str | None
    correlation_id: str | None
    priority: int
    optional: bool
    max_retries: int
    retry_policy: JSONObject | None
    due_ms: int
    headers: dict[str, str] | None = None
    key: str | None = None

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["headers"] = None

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["key"] = None

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.headers = dict(self.headers or {})
        a.step_id = self.step_id
        a.step_version = self.step_version
        a.definition = self.definition
        a.input = self.input
        a.config = self.config
        a.dependencies = self.dependencies
        a.root_execution_id = self.root_execution_id
        a.flow_id = self.flow_id
        a.parent_id = self.parent_id
        a.parent_execution_id = self.parent_execution_id
        a.correlation_id = self.correlation_id
        a.priority = self.priority
        a.optional = self.optional
        a.max_retries = self.max_retries
        a.retry_policy = self.retry_policy
        a.due_ms = self.due_ms
        a.status = "scheduled"


class StepLeased(ExecutionEvent):
    TOPIC = "stepsource:StepLeased"
    worker_id: str
    executor: str
    attempt: int
    lease_expires_ms: int

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        if a.attempt_open and self.attempt == a.attempt:
            if a.suspended:
                a.status = "executing"  # woken up: a suspension is not a lost worker
            else:
                a.leases_lost += 1  # the previous holder died with the attempt still running
        a.suspended = False
        a.parked = None
        a.worker_id = self.worker_id
        a.executor = self.executor
        attempt_leased(
            a.attempt_log,
            self.attempt,
            self.executor,
            self.worker_id,
            self.timestamp,
            a.created_on,
            a.modified_on,
        )


class StepStarted(ExecutionEvent):
    TOPIC = "stepsource:StepStarted"
    attempt: int
    worker_id: str
    step_version: str

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.attempt = self.attempt
        a.attempt_open = True
        a.attempt_step_version = self.step_version
        a.attempt_started_version = self.originator_version
        attempt_started(a.attempt_log, self.timestamp)
        a.status = "executing"
        if a.started_at is None:
            a.started_at = self.timestamp
        a.marked_complete = False
        a.completion_details = None
        a.suspended = False

    def history(self) -> tuple[str, JSONObject] | None:
        return "started", {"attempt": self.attempt, "worker_id": self.worker_id}


class StateSet(Recorded):
    TOPIC = "stepsource:StateSet"
    key: str
    value: JSON

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.state[self.key] = copy_json(self.value)

    def describe(self) -> str:
        return f"set_state({self.key!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "state-set", {"key": self.key, "value": self.value}

    def identity(self) -> object:
        return self.key


class StateUpdated(Recorded):
    TOPIC = "stepsource:StateUpdated"
    values: JSONObject

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.state.update(copy_json(self.values))

    def describe(self) -> str:
        return f"update_state({sorted(self.values)!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "state-set", {"values": self.values}


class StateDeleted(Recorded):
    TOPIC = "stepsource:StateDeleted"
    key: str

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.state.pop(self.key, None)

    def describe(self) -> str:
        return f"delete_state({self.key!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "state-deleted", {"key": self.key}

    def identity(self) -> object:
        return self.key


class CheckpointCreated(Recorded):
    TOPIC = "stepsource:CheckpointCreated"
    checkpoint_id: str
    metadata: JSONObject
    cursor: JSON
    items_processed: int | None
    accumulated_results: JSON

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.checkpoints[self.checkpoint_id] = {
            "id": self.checkpoint_id,
            "version": self.originator_version,
            "created_at": self.timestamp.isoformat(),
            "metadata": copy.deepcopy(self.metadata),
            "state": copy.deepcopy(aggregate.state),
            "cursor": copy.deepcopy(self.cursor),
            "items_processed": self.items_processed,
            "accumulated_results": copy.deepcopy(self.accumulated_results),
        }
        aggregate.latest_checkpoint_id = self.checkpoint_id

    def describe(self) -> str:
        return "create_checkpoint()"

    def history(self) -> tuple[str, JSONObject] | None:
        return "checkpoint", {"checkpoint_id": self.checkpoint_id, "metadata": self.metadata}


class CheckpointRestored(Recorded):
    TOPIC = "stepsource:CheckpointRestored"
    checkpoint_id: str

    def apply(self, aggregate: StepExecution) -> None:
        saved = aggregate.checkpoints[self.checkpoint_id]["state"]
        assert isinstance(saved, dict)
        aggregate.state = copy.deepcopy(saved)

    def describe(self) -> str:
        return f"restore_from_checkpoint({self.checkpoint_id!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "restored", {"checkpoint_id": self.checkpoint_id}

    def identity(self) -> object:
        return self.checkpoint_id


class HistoryEntryAdded(Recorded):
    TOPIC = "stepsource:HistoryEntryAdded"
    entry_type: str
    details: JSONObject

    def describe(self) -> str:
        return f"add_history_entry({self.entry_type!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return self.entry_type, self.details

    def identity(self) -> object:
        return self.entry_type


class SubStepCompleted(Recorded):
    """``ctx.do(name, fn)`` finished: its result, recorded once, returned on every replay.
    Version 2 adds ``body_started_ms``, when the body that made it began (epoch ms; None when
    read from an older log)."""

    TOPIC = "stepsource:SubStepCompleted"
    class_version = 2
    name: str
    value: JSON
    body_started_ms: int | None = None

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["body_started_ms"] = None

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.substeps[self.name] = {
            "ok": True,
            "value": copy.deepcopy(self.value),
            "attempt": self.attempt,
        }

    def describe(self) -> str:
        return f"ctx.do({self.name!r})"


class SubStepFailed(Recorded):
    """``ctx.do(name, fn)`` raised; a retry of the step runs it again. Version 2 adds
    ``body_started_ms`` (see :class:`SubStepCompleted`)."""

    TOPIC = "stepsource:SubStepFailed"
    class_version = 2
    name: str
    error_type: str
    error_message: str
    body_started_ms: int | None = None

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["body_started_ms"] = None

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.substeps[self.name] = {
            "ok": False,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attempt": self.attempt,
        }

    def describe(self) -> str:
        return f"ctx.do({self.name!r})"


class SubStepTryFailed(Recorded):
    """One try of ``ctx.do(name, fn, retry=...)`` raised (or timed out) and the sub-step
    will be tried again: the try number (1 = the first), the error, the backoff before the
    next try and when that try may start (epoch ms). Not matched by replay (``seq`` -2):
    the tries of the open attempt are read from the aggregate, so a resumed attempt goes on
    at the next try and waits out what is left of the backoff."""

    TOPIC = "stepsource:SubStepTryFailed"
    name: str
    try_number: int
    error_type: str
    error_message: str
    delay_ms: int
    retry_at_ms: int

    def apply(self, aggregate: StepExecution) -> None:
        tries = dict(aggregate.__dict__.get("substep_tries", {}))  # older snapshots lack it
        tries[self.name] = {
            "attempt": self.attempt,
            "tries": self.try_number,
            "retry_at_ms": self.retry_at_ms,
        }
        aggregate.substep_tries = tries

    def describe(self) -> str:
        return f"try {self.try_number} of ctx.do({self.name!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "substep_retry", {
            "name": self.name,
            "try": self.try_number,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "delay_ms": self.delay_ms,
        }


class ValueRecorded(Recorded):
    """A non-deterministic value (``ctx.now()``, ``random()``, ``uuid4()``) made replayable."""

    TOPIC = "stepsource:ValueRecorded"
    kind: str
    value: JSON

    def describe(self) -> str:
        return f"ctx.{self.kind}()"

    def identity(self) -> object:
        return self.kind


class PatchMarked(Recorded):
    """``ctx.patched(change_id)`` was first reached by code that has the change: from here
    on (retries included) the execution takes the new path. Matched by its change id, never
    by position (``seq`` is -1), so it shifts no operation after it."""

    TOPIC = "stepsource:PatchMarked"
    change_id: str

    def apply(self, aggregate: StepExecution) -> None:
        if self.change_id not in aggregate.patches:
            aggregate.patches.append(self.change_id)

    def describe(self) -> str:
        return f"ctx.patched({self.change_id!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "patched", {"change_id": self.change_id}


class ChildStarted(Recorded):
    """``ctx.start_step``/``run_step`` (or a DAG node) started a child execution."""

    TOPIC = "stepsource:ChildStarted"
    child_execution_id: str
    step_id: str
    node: str | None
    optional: bool

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.children[self.child_execution_id] = {
            "step_id": self.step_id,
            "node": self.node,
            "optional": self.optional,
        }


class GlobalStateRead(Recorded):
    """``get_global_state``: the value seen, so a replay sees the same one."""

    TOPIC = "stepsource:GlobalStateRead"
    key: str
    value: JSON
    found: bool


class GlobalStateWritten(Recorded):
    """``set_global_state`` or a successful ``compare_and_set_global_state``."""

    TOPIC = "stepsource:GlobalStateWritten"
    key: str
    value: JSON
    ttl_seconds: float | None

    def history(self) -> tuple[str, JSONObject] | None:
        return "global-state-set", {"key": self.key, "value": self.value}


class GlobalStateSwapRefused(Recorded):
    """A ``compare_and_set_global_state`` whose expected value was not the current one."""

    TOPIC = "stepsource:GlobalStateSwapRefused"
    key: str
    expected: JSON
    current: JSON


class TimerStarted(Recorded):
    """``ctx.sleep(seconds)``: the timer's fire time, fixed when first recorded."""

    TOPIC = "stepsource:TimerStarted"
    seconds: float
    fire_at_ms: int


class EventAwaited(Recorded):
    """``wait_for_event(name)`` (kind "event") or ``wait_for_condition`` (kind "condition")."""

    TOPIC = "stepsource:EventAwaited"
    name: str
    kind: str
    timeout_at_ms: int | None


class WaitEnded(ExecutionEvent):
    """Base of the events that end a wait, naming the wait by its coordinates."""

    TOPIC = "stepsource:WaitEnded"
    attempt: int
    wait_scope: str
    wait_seq: int


class TimerFired(WaitEnded):
    TOPIC = "stepsource:TimerFired"


class WaitSatisfied(WaitEnded):
    """The awaited event arrived (``received_version`` names its EventReceived, whose
    payload is ``value``) or the awaited condition became true."""

    TOPIC = "stepsource:WaitSatisfied"
    received_version: int | None
    value: JSON

    def apply(self, aggregate: StepExecution) -> None:
        if self.received_version is not None:
            aggregate.consumed_events.append(self.received_version)
            aggregate.unconsumed_events = [
                e for e in aggregate.unconsumed_events if e["version"] != self.received_version
            ]


class WaitTimedOut(WaitEnded):
    TOPIC = "stepsource:WaitTimedOut"


class Message(ExecutionEvent):
    """Base of client messages the lease holder moved from the inbox into the stream."""

    TOPIC = "stepsource:Message"
    inbox_id: int
    name: str

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.last_inbox_id = max(aggregate.last_inbox_id, self.inbox_id)


class SignalReceived(Message):
    TOPIC = "stepsource:SignalReceived"
    payload: JSON


class EventReceived(Message):
    TOPIC = "stepsource:EventReceived"
    payload: JSON

    def apply(self, aggregate: StepExecution) -> None:
        super().apply(aggregate)
        aggregate.unconsumed_events.append(
            {"version": self.originator_version, "name": self.name, "payload": self.payload}
        )


class UpdateAccepted(Message):
    TOPIC = "stepsource:UpdateAccepted"
    update_id: str
    args: list[JSON]


class UpdateCompleted(ExecutionEvent):
    TOPIC = "stepsource:UpdateCompleted"
    update_id: str
    ok: bool
    result: JSON
    error: str | None


class StepSuspended(ExecutionEvent):
    """The attempt waits without holding a worker: its lease is given up until ``wake_at_ms``
    (None: until a message arrives)."""

    TOPIC = "stepsource:StepSuspended"
    attempt: int
    reason: str
    wake_at_ms: int | None

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.suspended = True
        aggregate.status = "waiting"


class StepParked(ExecutionEvent):
    """The open attempt cannot resume on the handler that leased it (it diverges from the
    record, or its version cannot resume the attempt): the execution is not leased again
    until an operator releases it, or a worker whose handler differs (another step version or
    another ``code_hash``) starts. Recorded once per lease that finds it so."""

    TOPIC = "stepsource:StepParked"
    class_version = 2
    attempt: int
    reason: str
    step_version: str
    code_hash: str = ""
    """The hash of the parking worker's handler code ("" in logs written before it)."""

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["code_hash"] = ""

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.parked = self.reason
        aggregate.leases_lost = 0  # waiting for a fix is not a lost worker

    def history(self) -> tuple[str, JSONObject] | None:
        return "parked", {
            "reason": self.reason,
            "step_version": self.step_version,
            "code_hash": self.code_hash,
        }


class AttemptFailed(ExecutionEvent):
    TOPIC = "stepsource:AttemptFailed"
    attempt: int
    error_type: str
    error_message: str
    retry_at_ms: int | None

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.attempt_open = False
        a.failed_attempts += 1
        a.leases_lost = 0
        a.last_error = {"type": self.error_type, "message": self.error_message}
        a.status = "retrying" if self.retry_at_ms is not None else a.status
        error: JSONObject = {"type": self.error_type, "message": self.error_message}
        attempt_failed(a.attempt_log, self.timestamp, error, self.retry_at_ms)

    def history(self) -> tuple[str, JSONObject] | None:
        if self.retry_at_ms is None:
            return None  # the StepFailed that follows makes the entry
        error: JSONObject = {"type": self.error_type, "message": self.error_message}
        return "retry", {"attempt": self.attempt, "error": error, "retry_at": self.retry_at_ms}


class StepCompleted(Recorded):
    TOPIC = "stepsource:StepCompleted"
    output: JSON
    details: JSONObject | None

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.status = "completed"
        a.attempt_open = False
        a.output = copy.deepcopy(self.output)
        a.completion_details = copy.deepcopy(self.details)
        a.completed_at = self.timestamp

    def describe(self) -> str:
        return "return (StepCompleted)"

    def history(self) -> tuple[str, JSONObject] | None:
        return "completed", {"output": self.output, "details": self.details}


class StepFailed(Recorded):
    TOPIC = "stepsource:StepFailed"
    reason: str
    details: JSONObject | None
    error_type: str

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.status = "failed"
        a.attempt_open = False
        a.last_error = {"type": self.error_type, "message": self.reason}
        a.failure_details = copy.deepcopy(self.details)
        a.completed_at = self.timestamp

    def describe(self) -> str:
        return f"fail({self.reason!r})"

    def history(self) -> tuple[str, JSONObject] | None:
        return "failed", {"reason": self.reason, "details": self.details}


class StepCancelled(ExecutionEvent):
    TOPIC = "stepsource:StepCancelled"
    reason: str

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.status = "cancelled"
        a.attempt_open = False
        a.last_error = {"type": "cancelled", "message": self.reason}
        a.completed_at = self.timestamp

    def history(self) -> tuple[str, JSONObject] | None:
        return "cancelled", {"reason": self.reason}


ALL_EVENTS: tuple[type[ExecutionEvent], ...] = (
    StepScheduled,
    StepLeased,
    StepStarted,
    StateSet,
    StateUpdated,
    StateDeleted,
    CheckpointCreated,
    CheckpointRestored,
    HistoryEntryAdded,
    SubStepCompleted,
    SubStepFailed,
    SubStepTryFailed,
    ValueRecorded,
    PatchMarked,
    ChildStarted,
    GlobalStateRead,
    GlobalStateWritten,
    GlobalStateSwapRefused,
    TimerStarted,
    EventAwaited,
    TimerFired,
    WaitSatisfied,
    WaitTimedOut,
    SignalReceived,
    EventReceived,
    UpdateAccepted,
    UpdateCompleted,
    StepSuspended,
    StepParked,
    AttemptFailed,
    StepCompleted,
    StepFailed,
    StepCancelled,
)


EVENT_CLASSES: dict[str, type[ExecutionEvent]] = {}
"""The event class of every stored topic this code reads. A stored topic resolves only
through this table: a string in the log never imports a module."""


def register_event_class(cls: type[ExecutionEvent], topic: str | None = None) -> None:
    """Make ``cls`` the class that events stored under ``topic`` (its ``TOPIC`` by default)
    decode to: a class of stepsource's own, or one a user registers to read an older topic
    (its ``upcast_vN_vN+1`` methods upcast older ``class_version`` data)."""
    name = topic if topic is not None else cls.__dict__.get("TOPIC")
    if not name or not isinstance(cls, type) or not issubclass(cls, ExecutionEvent):
        raise TypeError(f"{cls!r} is not an ExecutionEvent class with its own TOPIC")
    register_topic(str(name), cls)
    EVENT_CLASSES[str(name)] = cls


def _register(classes: tuple[type[Any], ...]) -> None:
    for cls in classes:
        topic = cls.__dict__.get("TOPIC")
        if not topic or not str(topic).startswith(TOPIC_PREFIX):  # pragma: no cover
            raise RuntimeError(f"{cls.__name__} must define its own stable TOPIC")
        register_event_class(cls, topic)


_register((ExecutionEvent, Recorded, WaitEnded, Message, *ALL_EVENTS))
