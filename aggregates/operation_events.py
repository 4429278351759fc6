"""The events a handler's context operations record, and the messages and wait outcomes
delivered to an execution: state, checkpoints, history entries, sub-steps, recorded values,
patches, children, global state, timers and waits, signals, events and updates. Each has an
explicit, stable ``TOPIC`` (registered in :mod:`stepsource.aggregates.events`, which
re-exports them all).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from stepsource.aggregates.event_base import ExecutionEvent, Recorded
from stepsource.aggregates.values import JSON, JSONObject, copy_json

if TYPE_CHECKING:
    from stepsource.aggregates.execution import StepExecution

__all__ = [
    "CheckpointCreated",
    "CheckpointRestored",
    "ChildStarted",
    "EventAwaited",
    "EventReceived",
    "GlobalStateRead",
    "GlobalStateSwapRefused",
    "GlobalStateWritten",
    "HistoryEntryAdded",
    "Message",
    "PatchMarked",
    "SignalReceived",
    "StateDeleted",
    "StateSet",
    "StateUpdated",
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
]


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
