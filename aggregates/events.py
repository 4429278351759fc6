"""The events of a step execution: what happened, each carrying all its projection needs.

Event classes are stored data. Each has an explicit, stable ``TOPIC`` (``stepsource:Name``)
registered with eventsourcing, so moving this module never changes the stored format, and a
``class_version`` so an old event read by new code is upcast (``upcast_v1_v2`` on the class).
``apply`` folds an event into a :class:`~stepsource.aggregates.execution.StepExecution`; it
never reads a clock, a random source or the network.

Times other than ``timestamp`` are epoch milliseconds (ints), so every field is plain JSON.

This module holds an execution's lifecycle (scheduled, leased, started, suspended, parked,
attempt failed, completed, failed, cancelled) and the registry of every event class; the base
classes are in :mod:`.event_base`, what a handler's operations and messages record in
:mod:`.operation_events`, all re-exported here.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from eventsourcing.domain import AggregateCreated
from eventsourcing.utils import register_topic, resolve_topic

from stepsource.aggregates.attempt_log import attempt_failed, attempt_leased, attempt_started
from stepsource.aggregates.event_base import TOPIC_PREFIX, ExecutionEvent, Recorded
from stepsource.aggregates.operation_events import (
    CheckpointCreated,
    CheckpointRestored,
    ChildStarted,
    EventAwaited,
    EventReceived,
    GlobalStateRead,
    GlobalStateSwapRefused,
    GlobalStateWritten,
    HistoryEntryAdded,
    Message,
    PatchMarked,
    SignalReceived,
    StateDeleted,
    StateSet,
    StateUpdated,
    SubStepCompleted,
    SubStepFailed,
    SubStepTryFailed,
    TimerFired,
    TimerStarted,
    UpdateAccepted,
    UpdateCompleted,
    ValueRecorded,
    WaitEnded,
    WaitSatisfied,
    WaitTimedOut,
)
from stepsource.aggregates.values import JSON, JSONObject

if TYPE_CHECKING:
    from stepsource.aggregates.execution import StepExecution

__all__ = [
    "ALL_EVENTS",
    "EVENT_CLASSES",
    "TOPIC_PREFIX",
    "AttemptFailed",
    "BackendOutage",
    "CheckpointCreated",
    "CheckpointRestored",
    "ChildStarted",
    "EventAwaited",
    "EventReceived",
    "ExecutionEvent",
    "GlobalStateRead",
    "GlobalStateSwapRefused",
    "GlobalStateWritten",
    "HistoryEntryAdded",
    "Message",
    "PatchMarked",
    "Recorded",
    "SignalReceived",
    "StateDeleted",
    "StateSet",
    "StateUpdated",
    "StepCancelled",
    "StepCompleted",
    "StepContinued",
    "StepFailed",
    "StepLeased",
    "StepParked",
    "StepScheduled",
    "StepStarted",
    "StepSuspended",
    "StepThrottled",
    "SubStepCompleted",
    "SubStepFailed",
    "SubStepTryFailed",
    "TimerFired",
    "TimerStarted",
    "UpdateAccepted",
    "UpdateCompleted",
    "ValueRecorded",
    "WaitEnded",
    "WaitSatisfied",
    "WaitTimedOut",
    "register_event_class",
]


class StepScheduled(AggregateCreated, ExecutionEvent):
    """An execution is created. Version 2 adds ``headers``: string pairs the starter's
    interceptors passed along (a trace context), handed to every attempt; version 3 the
    business ``key`` it was started with (None without one); version 4 ``continued_from``,
    the execution that continued as this one (``ctx.continue_as_new``; None for a fresh
    start), with ``chain_root``, the chain's first run, and ``chain_run``, this run's number
    in it (from 1; the first run has no root of its own)."""

    TOPIC = "stepsource:StepScheduled"
    class_version = 4
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
    continued_from: str | None = None
    chain_root: str | None = None
    chain_run: int = 1

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["headers"] = None

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["key"] = None

    @staticmethod
    def upcast_v3_v4(state: dict[str, Any]) -> None:
        state["continued_from"] = None
        state["chain_root"] = None
        state["chain_run"] = 1

    def mutate(self, aggregate: Any) -> Any:
        """The library's creation of the aggregate, in one call: the class the event's
        ``originator_topic`` names, its base init (id, version, creation time) and its own
        ``__init__`` (which takes no arguments), then ``apply``; the library picks each
        init's arguments out of the event's attributes on every call
        (``tests/test_lifecycle_lean.py`` compares the two)."""
        assert aggregate is None
        cls = resolve_topic(self.originator_topic)
        created = cls.__new__(cls)
        created.__base_init__(self.originator_id, self.originator_version, self.timestamp)
        created.__init__()
        self.apply(created)
        return created

    def apply(self, aggregate: StepExecution) -> None:
        a = aggregate
        a.headers = dict(self.headers or {})
        if self.continued_from is not None:
            a.continued_from = self.continued_from
            a.chain_root = self.chain_root
            a.chain_run = self.chain_run
        if self.key is not None:
            a.business_key = self.key
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
        if a.status == "throttled":  # admitted after waiting for flow control
            a.status = "executing" if a.attempt_open else "scheduled"
        lost = a.attempt_open and self.attempt == a.attempt
        if lost and (a.suspended or a.parked is not None):
            # woken up, or released: a suspension or a parking is not a lost worker
            a.status = "executing"
            lost = False
        elif lost:
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
            taken_over=lost,
        )


class BackendOutage(ExecutionEvent):
    """The takeover just recorded (the StepLeased before it, in the same commit) followed a
    backend outage: the worker that took the lease could not reach the backend itself after
    the previous holder's last recorded event (``since_ms``; it last failed at
    ``unreachable_ms``), so the previous holder may have been alive and cut off. The takeover
    does not count toward the lost-worker cutoff (``leases_lost``); see docs/runtime.md."""

    TOPIC = "stepsource:BackendOutage"
    worker_id: str
    attempt: int
    since_ms: int
    unreachable_ms: int

    def apply(self, aggregate: StepExecution) -> None:
        if aggregate.leases_lost > 0:
            aggregate.leases_lost -= 1


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
        aggregate.status = "parked"  # as the executions index says
        aggregate.leases_lost = 0  # waiting for a fix is not a lost worker

    def history(self) -> tuple[str, JSONObject] | None:
        return "parked", {
            "reason": self.reason,
            "step_version": self.step_version,
            "code_hash": self.code_hash,
        }


class StepThrottled(ExecutionEvent):
    """The execution waits for a concurrency slot (``reason`` "concurrency") or for room in
    its rate window ("rate"), holding no worker: back in the queue until ``retry_at_ms``, or
    sooner when a slot frees. Recorded once per wait; the next StepLeased ends it."""

    TOPIC = "stepsource:StepThrottled"
    reason: str
    retry_at_ms: int

    def apply(self, aggregate: StepExecution) -> None:
        aggregate.status = "throttled"

    def history(self) -> tuple[str, JSONObject] | None:
        return "throttled", {"reason": self.reason, "retry_at_ms": self.retry_at_ms}


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


class StepContinued(StepCompleted):
    """The run ended by continuing as a new execution (``ctx.continue_as_new``): ``successor``
    is its id, ``input`` what it was started with. A StepCompleted with no output, so every
    reader that knows an execution's ends knows this one; its status stays ``completed``."""

    TOPIC = "stepsource:StepContinued"
    successor: str
    input: JSONObject

    def apply(self, aggregate: StepExecution) -> None:
        super().apply(aggregate)
        aggregate.continued_as = self.successor

    def describe(self) -> str:
        return "continue_as_new (StepContinued)"

    def history(self) -> tuple[str, JSONObject] | None:
        return "continued", {"execution_id": self.successor, "input": self.input}


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
    BackendOutage,
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
    StepThrottled,
    AttemptFailed,
    StepCompleted,
    StepContinued,
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
