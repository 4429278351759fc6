"""The StepExecution aggregate: one step execution's decisions, folded from its events.

Commands validate first and then trigger exactly one event, so a refused command records
nothing. The aggregate holds only JSON-native attributes (plus its id and timestamps), which
keeps it snapshot-able. It reads no clock: timestamps are passed in by the caller.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate
from eventsourcing.utils import register_topic

from stepsource.aggregates import events as ev
from stepsource.aggregates.attempt_log import new_attempt_log
from stepsource.aggregates.encoding import Unusual, build_event, create, plain_json, stored_body
from stepsource.aggregates.values import (
    DEFAULT_LIMITS,
    JSON,
    JSONObject,
    Limits,
    error_text,
    start_headers,
    state_key,
    to_json_object,
    to_json_reference,
)
from stepsource.errors import (
    LimitExceededError,
    UnknownCheckpointError,
    UsageError,
)

__all__ = ["TERMINAL_STATUSES", "OpCoordinates", "StepExecution"]

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

OpCoordinates = tuple[int, str, int, str]
"""(attempt, scope, seq, step_version) of a recording operation."""


class StepExecution(Aggregate):
    """One step execution. Its stable topic is set below, after eventsourcing has defined
    the class (a TOPIC in the body would demand explicit topics on generated classes)."""

    #: why the open attempt is parked (StepParked), None if it is not; a class default so
    #: snapshots taken before parking existed read as not parked
    parked: str | None = None

    #: bytes of the payloads of the pending (not yet committed) events: what a buffer bound
    #: is measured against (never stored in a snapshot)
    pending_bytes: int = 0

    #: the stored bodies of pending events recorded by commands, by version
    #: (:mod:`~stepsource.aggregates.encoding`): set while events are pending, gone after
    pending_bodies: dict[int, bytes] | None = None

    #: the execution that continued as this one, and the one this one continued as
    #: (``ctx.continue_as_new``); class defaults, so older snapshots read as neither
    continued_from: str | None = None
    continued_as: str | None = None
    #: the first run of its chain (None: it is the first) and its number in the chain
    chain_root: str | None = None
    chain_run: int = 1
    #: the business key it was started with (``engine.start(..., key=...)``), if any
    business_key: str | None = None

    def __init__(self) -> None:
        self.step_id = ""
        self.step_version = ""
        self.definition: JSONObject = {}
        self.input: JSONObject = {}
        self.config: JSONObject = {}
        self.dependencies: JSONObject = {}
        self.root_execution_id: str | None = None
        self.children: dict[str, JSONObject] = {}
        self.flow_id: str | None = None
        self.parent_id: str | None = None
        self.parent_execution_id: str | None = None
        self.correlation_id: str | None = None
        #: string pairs the starter's interceptors passed to every attempt (trace context)
        self.headers: dict[str, str] = {}
        self.priority = 0
        self.optional = False
        self.max_retries = 0
        self.retry_policy: JSONObject | None = None
        self.due_ms = 0
        self.status = "scheduled"
        self.state: JSONObject = {}
        self.checkpoints: dict[str, JSONObject] = {}
        self.substeps: dict[str, JSONObject] = {}
        #: name -> {attempt, tries, retry_at_ms} of the ctx.do retries (SubStepTryFailed);
        #: read with tries_of_substeps(), as snapshots older than retries lack it
        self.substep_tries: dict[str, JSONObject] = {}
        #: change ids of ctx.patched() calls that took the new path (in any attempt)
        self.patches: list[str] = []
        self.consumed_events: list[int] = []
        #: events received and not yet consumed by a wait, oldest first (version, name,
        #: payload): what the next wait_for_event(name) takes, without reading the log
        self.unconsumed_events: list[JSONObject] = []
        self.last_inbox_id = 0
        self.suspended = False
        self.latest_checkpoint_id: str | None = None
        self.attempt = 0
        self.attempt_open = False
        self.attempt_started_version = 0
        self.attempt_step_version = ""
        self.failed_attempts = 0
        self.leases_lost = 0
        self.worker_id: str | None = None
        self.executor: str | None = None
        self.started_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.marked_complete = False
        self.completion_details: JSONObject | None = None
        self.output: JSON = None
        self.last_error: JSONObject | None = None
        self.failure_details: JSONObject | None = None
        #: the execution record's attempt entries, start and retries (see attempt_log)
        self.attempt_log: JSONObject = new_attempt_log()
        self.limits = DEFAULT_LIMITS

    # -- identity and status -------------------------------------------------------------
    @functools.cached_property
    def execution_id(self) -> str:
        """The id as a string, formatted once (a run of an empty step asks for it about ten
        times); kept out of snapshots (:mod:`stepsource.engine.snapshots`)."""
        return str(self.id)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def _where(self) -> dict[str, Any]:
        return {"execution_id": self.execution_id, "step_id": self.step_id}

    def _json(self, value: Any, what: str) -> JSON:
        limits = self.limits
        try:  # the usual value: checked and copied in one walk, nothing else built
            return plain_json(value, limits.max_depth, limits.max_key_length)  # type: ignore[no-any-return]
        except Unusual:
            return to_json_reference(value, what=what, limits=limits, **self._where())

    def _json_object(self, value: Any, what: str) -> JSONObject:
        return to_json_object(value, what=what, limits=self.limits, **self._where())

    def _require_running(self, operation: str) -> None:
        if self.is_terminal:
            raise UsageError(
                f"{operation} refused: the execution is already {self.status}",
                hint="An ended execution records nothing more; start a new execution",
                **self._where(),
            )
        if self.marked_complete:
            raise UsageError(
                f"{operation} refused: ctx.complete() was already called in this attempt",
                hint="Call complete() last, then return the output from the handler",
                **self._where(),
            )

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def schedule(
        cls,
        *,
        execution_id: uuid.UUID,
        timestamp: datetime,
        step_id: str,
        step_version: str,
        definition: JSONObject,
        input: JSONObject,
        config: JSONObject,
        dependencies: JSONObject | None = None,
        flow_id: str | None = None,
        root_execution_id: str | None = None,
        parent_id: str | None = None,
        parent_execution_id: str | None = None,
        correlation_id: str | None = None,
        priority: int = 0,
        optional: bool = False,
        max_retries: int = 0,
        retry_policy: JSONObject | None = None,
        due_ms: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        headers: dict[str, str] | None = None,
        key: str | None = None,
        continues: tuple[str, str, int] | None = None,
    ) -> StepExecution:
        """A new execution. ``definition``, ``input``, ``config`` and ``dependencies`` are
        recorded as given: strict JSON objects of the caller's own, as :func:`to_json_object`
        returns them: the engine walks each once, before the record, as it needs them then."""
        where = {"execution_id": str(execution_id), "step_id": step_id}
        agg: StepExecution = create(  # the library's _create, leaner
            cls,
            ev.StepScheduled,
            originator_id=execution_id,
            timestamp=timestamp,
            step_id=step_id,
            step_version=step_version,
            definition=definition,
            input=input,
            config=config,
            dependencies={} if dependencies is None else dependencies,
            flow_id=flow_id,
            root_execution_id=root_execution_id,
            parent_id=parent_id,
            parent_execution_id=parent_execution_id,
            correlation_id=correlation_id,
            priority=priority,
            optional=optional,
            max_retries=max_retries,
            retry_policy=retry_policy,
            due_ms=due_ms,
            headers=start_headers(headers, where) if headers else None,
            key=key,
            continued_from=continues[0] if continues else None,
            chain_root=continues[1] if continues else None,
            chain_run=continues[2] if continues else 1,
        )
        agg.limits = limits
        return agg

    # -- attempts ------------------------------------------------------------------------
    def next_attempt_number(self) -> int:
        """The attempt a worker taking the lease now runs: the open one, or a new one."""
        return self.attempt if self.attempt_open else self.attempt + 1

    def lease(
        self, *, timestamp: datetime, worker_id: str, executor: str, lease_expires_ms: int
    ) -> None:
        self._require_running("leasing")
        self.trigger_event(
            ev.StepLeased,
            timestamp=timestamp,
            worker_id=worker_id,
            executor=executor,
            attempt=self.next_attempt_number(),
            lease_expires_ms=lease_expires_ms,
        )

    def start_attempt(self, *, timestamp: datetime, worker_id: str, step_version: str) -> None:
        self._require_running("starting an attempt")
        if self.attempt_open:
            raise UsageError("an attempt is already running", **self._where())
        self.trigger_event(
            ev.StepStarted,
            timestamp=timestamp,
            attempt=self.attempt + 1,
            worker_id=worker_id,
            step_version=step_version,
        )

    def fail_attempt(
        self,
        *,
        timestamp: datetime,
        error_type: str,
        error_message: str,
        retry_at_ms: int | None,
    ) -> None:
        self._require_attempt("recording a failed attempt")
        self.trigger_event(
            ev.AttemptFailed,
            timestamp=timestamp,
            attempt=self.attempt,
            error_type=error_type,
            error_message=error_message,
            retry_at_ms=retry_at_ms,
        )

    def _require_attempt(self, operation: str) -> None:
        self._require_running(operation)
        if not self.attempt_open:
            raise UsageError(f"{operation} refused: no attempt is running", **self._where())

    # -- recording operations ------------------------------------------------------------
    def set_state(self, key: str, value: Any, *, timestamp: datetime, op: OpCoordinates) -> None:
        self._require_attempt("set_state")
        key = state_key(key, self.limits, self._where)
        data = self._json(value, f"state value {key!r}")
        self._record(ev.StateSet, timestamp, op, key=key, value=data)

    def update_state(self, values: Any, *, timestamp: datetime, op: OpCoordinates) -> None:
        self._require_attempt("update_state")
        data = self._json_object(values, "update_state values")
        for key in data:
            state_key(key, self.limits, self._where)
        self._record(ev.StateUpdated, timestamp, op, values=data)

    def delete_state(self, key: str, *, timestamp: datetime, op: OpCoordinates) -> None:
        self._require_attempt("delete_state")
        self._record(ev.StateDeleted, timestamp, op, key=state_key(key, self.limits, self._where))

    def create_checkpoint(
        self,
        checkpoint_id: str,
        *,
        metadata: Any,
        cursor: Any,
        items_processed: int | None,
        accumulated_results: Any,
        timestamp: datetime,
        op: OpCoordinates,
    ) -> None:
        self._require_attempt("create_checkpoint")
        if items_processed is not None and (
            isinstance(items_processed, bool) or not isinstance(items_processed, int)
        ):
            raise UsageError(
                f"items_processed must be an int, not {type(items_processed).__name__}",
                **self._where(),
            )
        self._record(
            ev.CheckpointCreated,
            timestamp,
            op,
            checkpoint_id=checkpoint_id,
            metadata=self._json_object({} if metadata is None else metadata, "checkpoint metadata"),
            cursor=self._json(cursor, "checkpoint cursor"),
            items_processed=items_processed,
            accumulated_results=self._json(accumulated_results, "accumulated_results"),
        )

    def restore_checkpoint(
        self, checkpoint_id: str, *, timestamp: datetime, op: OpCoordinates
    ) -> None:
        self._require_attempt("restore_from_checkpoint")
        self.require_checkpoint(checkpoint_id)
        self._record(ev.CheckpointRestored, timestamp, op, checkpoint_id=checkpoint_id)

    def require_checkpoint(self, checkpoint_id: Any) -> JSONObject:
        if not isinstance(checkpoint_id, str) or checkpoint_id not in self.checkpoints:
            known = ", ".join(list(self.checkpoints)[-5:]) or "none yet"
            raise UnknownCheckpointError(
                f"no checkpoint {checkpoint_id!r} in this execution (latest: {known})",
                hint="Use an id returned by create_checkpoint() or listed by get_all_checkpoints()",
                **self._where(),
            )
        return self.checkpoints[checkpoint_id]

    def add_history_entry(
        self, entry_type: str, details: Any, *, timestamp: datetime, op: OpCoordinates
    ) -> None:
        self._require_attempt("add_history_entry")
        if not isinstance(entry_type, str) or not entry_type:
            raise UsageError("a history entry type must be a non-empty str", **self._where())
        data = self._json_object({} if details is None else details, "history entry details")
        self._record(ev.HistoryEntryAdded, timestamp, op, entry_type=entry_type, details=data)

    def record_substep(
        self,
        name: str,
        *,
        value: Any = None,
        error: BaseException | None = None,
        timestamp: datetime,
        op: OpCoordinates,
        body_started_ms: int | None = None,
    ) -> None:
        """The outcome of ``ctx.do(name, fn)``: its JSON result, or the error it raised."""
        self._require_attempt(f"ctx.do({name!r})")
        if error is None:
            data = self._json(value, f"the result of ctx.do({name!r})")
            self._record(
                ev.SubStepCompleted,
                timestamp,
                op,
                name=name,
                value=data,
                body_started_ms=body_started_ms,
            )
        else:
            message = error_text(error, about=self.execution_id)
            self._record(
                ev.SubStepFailed,
                timestamp,
                op,
                name=name,
                error_type=type(error).__name__,
                error_message=message,
                body_started_ms=body_started_ms,
            )

    def substep_try(self, name: str) -> JSONObject | None:
        """The last failed try of ``ctx.do(name, retry=...)`` folded in, if any."""
        tries: dict[str, JSONObject] = self.__dict__.get("substep_tries", {})
        return tries.get(name)

    def record_substep_try(
        self,
        name: str,
        *,
        try_number: int,
        error: BaseException,
        delay_ms: int,
        retry_at_ms: int,
        timestamp: datetime,
        op: OpCoordinates,
    ) -> None:
        """A failed try of ``ctx.do(name, fn, retry=...)`` that will be tried again."""
        self._require_attempt(f"ctx.do({name!r})")
        self._record(
            ev.SubStepTryFailed,
            timestamp,
            op,
            name=name,
            try_number=try_number,
            error_type=type(error).__name__,
            error_message=error_text(error, about=self.execution_id),
            delay_ms=delay_ms,
            retry_at_ms=retry_at_ms,
        )

    def start_child(
        self,
        child_execution_id: str,
        step_id: str,
        *,
        node: str | None,
        optional: bool,
        timestamp: datetime,
        op: OpCoordinates,
    ) -> None:
        self._require_attempt(f"starting child step {step_id!r}")
        self._record(
            ev.ChildStarted,
            timestamp,
            op,
            child_execution_id=child_execution_id,
            step_id=step_id,
            node=node,
            optional=optional,
        )

    def record_global(
        self,
        event_class: type[ev.Recorded],
        *,
        timestamp: datetime,
        op: OpCoordinates,
        **fields: Any,
    ) -> None:
        """Record what a global-state operation saw or did (it already happened)."""
        self._require_attempt("global state")
        for name in ("value", "expected", "current"):
            if name in fields:
                fields[name] = self._json(fields[name], f"global state {name}")
        self._record(event_class, timestamp, op, **fields)

    def mark_patch(self, change_id: str, *, timestamp: datetime, op: OpCoordinates) -> None:
        self._require_attempt("ctx.patched()")
        self._record(ev.PatchMarked, timestamp, op, change_id=change_id)

    def record_value(
        self, kind: str, value: Any, *, timestamp: datetime, op: OpCoordinates
    ) -> None:
        self._require_attempt(f"ctx.{kind}()")
        self._record(ev.ValueRecorded, timestamp, op, kind=kind, value=self._json(value, kind))

    # -- waits and messages ----------------------------------------------------------------
    def start_timer(
        self, seconds: float, fire_at_ms: int, *, timestamp: datetime, op: OpCoordinates
    ) -> None:
        self._require_attempt("sleep")
        self._record(ev.TimerStarted, timestamp, op, seconds=seconds, fire_at_ms=fire_at_ms)

    def await_event(
        self,
        name: str,
        kind: str,
        timeout_at_ms: int | None,
        *,
        timestamp: datetime,
        op: OpCoordinates,
    ) -> None:
        self._require_attempt(f"wait_for_{kind}")
        self._record(
            ev.EventAwaited, timestamp, op, name=name, kind=kind, timeout_at_ms=timeout_at_ms
        )

    def end_wait(
        self,
        event_class: type[ev.WaitEnded],
        wait_scope: str,
        wait_seq: int,
        *,
        timestamp: datetime,
        **fields: Any,
    ) -> None:
        self._require_attempt("ending a wait")
        if "value" in fields:
            fields["value"] = self._json(fields["value"], "the awaited event's payload")
        self.trigger_event(
            event_class,
            timestamp=timestamp,
            attempt=self.attempt,
            wait_scope=wait_scope,
            wait_seq=wait_seq,
            **fields,
        )

    def receive(
        self,
        message_class: type[ev.Message],
        *,
        inbox_id: int,
        name: str,
        timestamp: datetime,
        **fields: Any,
    ) -> None:
        """Move a client message from the inbox into the stream."""
        self._require_running("receiving a message")
        self.trigger_event(
            message_class, timestamp=timestamp, inbox_id=inbox_id, name=name, **fields
        )

    def complete_update(
        self,
        update_id: str,
        *,
        ok: bool,
        result: Any,
        error: str | None,
        timestamp: datetime,
    ) -> None:
        self._require_running("completing an update")
        data = self._json(result, "the update's result") if ok else None
        self.trigger_event(
            ev.UpdateCompleted,
            timestamp=timestamp,
            update_id=update_id,
            ok=ok,
            result=data,
            error=error,
        )

    def suspend(self, reason: str, wake_at_ms: int | None, *, timestamp: datetime) -> None:
        self._require_attempt("suspending")
        self.trigger_event(
            ev.StepSuspended,
            timestamp=timestamp,
            attempt=self.attempt,
            reason=reason,
            wake_at_ms=wake_at_ms,
        )

    def park(self, reason: str, step_version: str, code_hash: str, *, timestamp: datetime) -> None:
        """StepParked: the open attempt waits for a release or for another handler."""
        self.trigger_event(
            ev.StepParked,
            timestamp=timestamp,
            attempt=self.attempt,
            reason=reason,
            step_version=step_version,
            code_hash=code_hash,
        )

    def throttle(self, reason: str, retry_at_ms: int, *, timestamp: datetime) -> None:
        """StepThrottled: flow control holds the execution back until ``retry_at_ms``."""
        self.trigger_event(
            ev.StepThrottled, timestamp=timestamp, reason=reason, retry_at_ms=retry_at_ms
        )

    def mark_complete(self, details: Any) -> JSONObject | None:
        """``ctx.complete()``: validated now, recorded with StepCompleted at the end."""
        self._require_attempt("complete")
        data = None if details is None else self._json_object(details, "completion details")
        self.marked_complete = True
        self.completion_details = data
        return data

    def withdraw_completion(self) -> None:
        """A failure after ``ctx.complete()`` voids the mark (StepCompleted comes at return)."""
        self.marked_complete, self.completion_details = False, None

    def complete(self, output: Any, *, timestamp: datetime, op: OpCoordinates) -> None:
        if self.is_terminal:
            self._require_running("completing")
        self._require_open_attempt_for_end("completing")
        details = self.completion_details if self.marked_complete else None
        self._record(
            ev.StepCompleted, timestamp, op, output=self._json(output, "output"), details=details
        )

    def continue_as_new(
        self, successor: str, input: JSONObject, *, timestamp: datetime, op: OpCoordinates
    ) -> None:
        """StepContinued: this run ends, handing over to the execution ``successor``."""
        self._require_running("continue_as_new")
        self._require_open_attempt_for_end("continue_as_new")
        self._record(
            ev.StepContinued,
            timestamp,
            op,
            output=None,
            details={"continued_as": successor},
            successor=successor,
            input=self._json_object(input, "continue_as_new input"),
        )

    def fail(
        self,
        reason: str,
        details: Any,
        *,
        error_type: str,
        timestamp: datetime,
        op: OpCoordinates,
    ) -> None:
        self._require_running("fail")
        data = None if details is None else self._json_object(details, "failure details")
        self._record(
            ev.StepFailed, timestamp, op, reason=str(reason), details=data, error_type=error_type
        )

    def cancel(self, reason: str, *, timestamp: datetime) -> None:
        self._require_running("cancel")
        self.trigger_event(ev.StepCancelled, timestamp=timestamp, reason=str(reason))

    def _require_open_attempt_for_end(self, operation: str) -> None:
        if not self.attempt_open:
            raise UsageError(f"{operation} refused: no attempt is running", **self._where())

    def _event(
        self, event_class: type[ev.Recorded], timestamp: datetime, op: OpCoordinates, **fields: Any
    ) -> tuple[ev.Recorded, bytes]:
        """The event ``_record`` would record, with its stored body; LimitExceededError when
        the body is over the payload limit."""
        attempt, scope, seq, step_version = op
        values = {
            "originator_id": self._id,
            "originator_version": self._version + 1,
            "timestamp": timestamp,
            "attempt": attempt,
            "scope": scope,
            "seq": seq,
            "step_version": step_version,
            **fields,
        }
        # what trigger_event does, without its per-call topic check and kwargs copies
        event = build_event(event_class, values)
        # serialised once, as it will be stored: the limit is checked on those bytes
        body = stored_body(event)
        if len(body) > self.limits.max_payload_bytes:
            raise LimitExceededError(
                f"{event_class.__name__} would carry {len(body)} bytes, over the payload limit "
                f"of {self.limits.max_payload_bytes}",
                hint="Store large data outside the execution and record a reference, or raise "
                "the limit with Engine(max_payload_bytes=...)",
                **self._where(),
            )
        return event, body

    def check_fits(
        self,
        event_class: type[ev.Recorded],
        *,
        timestamp: datetime,
        op: OpCoordinates,
        **fields: Any,
    ) -> None:
        """Raise what recording this event would raise for its size, recording nothing (for
        an operation whose side effect comes before its record)."""
        self._event(event_class, timestamp, op, **fields)

    def _record(
        self, event_class: type[ev.Recorded], timestamp: datetime, op: OpCoordinates, **fields: Any
    ) -> None:
        event, body = self._event(event_class, timestamp, op, **fields)
        event.mutate(self)
        self._pending_events.append(event)
        self.pending_bytes += len(body)
        bodies = self.__dict__.get("pending_bodies")
        if bodies is None:
            bodies = self.pending_bodies = {}
        bodies[event.originator_version] = body

    def collect_events(self) -> list[ev.ExecutionEvent]:
        """The pending events in order, leaving none (one copy, where the library pops them
        one at a time: a buffer of a thousand events is collected in one step)."""
        collected: list[ev.ExecutionEvent] = list(self._pending_events)  # type: ignore[arg-type]
        self._pending_events.clear()
        self.pending_bytes = 0
        self.__dict__.pop("pending_bodies", None)
        return collected

    def collect_encoded(self) -> tuple[list[ev.ExecutionEvent], dict[int, bytes]]:
        """:meth:`collect_events`, with the stored bodies made as they were recorded (by
        version; events recorded otherwise have none)."""
        bodies: dict[int, bytes] = self.__dict__.get("pending_bodies") or {}
        return self.collect_events(), bodies


StepExecution.TOPIC = "stepsource:StepExecution"  # type: ignore[attr-defined]
register_topic("stepsource:StepExecution", StepExecution)
