"""StepContext: everything a handler does through it is an event in its execution's log.

Recording operations are awaited and return once their event is durable (sharing commits
with other executions through the backend's group commit). ``add_history_entry`` and
``log`` are plain calls: the history entry is committed with the next awaited operation or
at the end of the attempt. On a resumed attempt, operations already in the log are matched
by their coordinates and return the recorded result without appending (see ``replay``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, NoReturn, TypeVar

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import OpCoordinates, StepExecution
from stepsource.aggregates.values import JSON, JSONObject, with_article
from stepsource.engine.arguments import check_name
from stepsource.engine.children import ChildHandle, start_child
from stepsource.engine.clock import MAX_WAIT_SECONDS
from stepsource.engine.continuation import continue_as_new
from stepsource.engine.definitions import RetryPolicy
from stepsource.engine.global_state import compare_and_set_global, get_global, set_global
from stepsource.engine.ids import checkpoint_id_of
from stepsource.engine.recorder import HistoryNeeded, Recorder
from stepsource.engine.sagas import Saga, check_saga_name
from stepsource.engine.scope import SCOPE
from stepsource.engine.substep_policy import tries_of
from stepsource.engine.substeps import run_substep
from stepsource.engine.transactions import run_transaction
from stepsource.engine.waiting import Outcome, wait
from stepsource.errors import (
    StepFailedError,
    UnknownQueryError,
    UsageError,
    WaitTimeout,
)
from stepsource.projections.folds import checkpoints_of, history_of
from stepsource.projections.models import (
    CheckpointInfo,
    ExecutionInfo,
    ExecutionMetadata,
    HistoryEntry,
    StepMetadata,
)

__all__ = ["StepContext"]

T = TypeVar("T")


_logger = logging.getLogger("stepsource.step")
_MISSING: Any = object()


class StepContext:
    """The handler's view of its execution: state, checkpoints, history, lifecycle, inputs."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._do_names: set[str] = set()
        self._saga_names: set[str] = set()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def recorder(self) -> Recorder:
        """The recorder below this context: coordinates, matching and commits of its
        operations (for extensions built on the engine, such as DAG flows; a handler never
        needs it)."""
        return self._recorder

    @property
    def _agg(self) -> StepExecution:
        return self._recorder.aggregate

    def _op(self, name: str) -> OpCoordinates:
        return self._recorder.op(name)

    def _match(
        self, op: OpCoordinates, attempted: str, expected: type[ev.Recorded], identity: object
    ) -> ev.Recorded | None:
        return self._recorder.match(op, attempted, expected, identity)

    # -- identity and metadata ---------------------------------------------------------------
    @property
    def info(self) -> ExecutionInfo:
        a = self._agg
        return ExecutionInfo(
            step_id=a.step_id,
            flow_id=a.flow_id,
            execution_id=a.execution_id,
            attempt_number=a.next_attempt_number(),
            correlation_id=a.correlation_id,
            parent_id=a.parent_id,
            parent_execution_id=a.parent_execution_id,
            worker_id=self._recorder.worker_id,
            priority=a.priority,
        )

    @property
    def step_metadata(self) -> StepMetadata:
        d = self._recorder.definition
        return StepMetadata(
            id=d.step_id, version=d.version, display_name=d.display_name, description=d.description
        )

    @property
    def execution_metadata(self) -> ExecutionMetadata:
        a = self._agg
        succeeded = {"completed": True, "failed": False, "cancelled": False}.get(a.status)
        return ExecutionMetadata(
            status=a.status,
            started_at=a.started_at,
            completed_at=a.completed_at,
            succeeded=succeeded,
        )

    @property
    def execution_id(self) -> str:
        return self._agg.execution_id

    @property
    def task_uuid(self) -> str:
        """The id of the whole task: the flow's root execution, or this execution."""
        return self._agg.root_execution_id or self._agg.execution_id

    @property
    def step_uuid(self) -> str:
        return self._agg.execution_id

    @property
    def correlation_id(self) -> str | None:
        return self._agg.correlation_id

    # -- inputs, config, dependencies of DAG nodes ------------------------------------------
    @property
    def input_data(self) -> JSONObject:
        return copy.deepcopy(self._agg.input)

    @property
    def step_config(self) -> JSONObject:
        return copy.deepcopy(self._agg.config)

    def get_input(self, key: str) -> JSON:
        return copy.deepcopy(self._agg.input.get(key))

    def get_input_or(self, key: str, default: Any) -> Any:
        value = self._agg.input.get(key, _MISSING)
        return default if value is _MISSING or value is None else copy.deepcopy(value)

    def get_config(self, key: str) -> JSON:
        return copy.deepcopy(self._agg.config.get(key))

    def get_dependency_result(self, step: str) -> JSON:
        """An upstream node's result, unwrapped from its ``{"result": value}`` envelope."""
        value = self._agg.dependencies.get(step)
        if isinstance(value, dict) and set(value) == {"result"}:
            value = value["result"]
        return copy.deepcopy(value)

    def get_dependency_field(self, step: str, *path: str | int) -> JSON:
        value = self.get_dependency_result(step)
        for part in path:
            if isinstance(value, dict) and isinstance(part, str):
                value = value.get(part)
            elif (
                isinstance(value, list)
                and isinstance(part, int)
                and -len(value) <= part < len(value)
            ):
                value = value[part]
            else:
                return None
        return value

    # -- retries --------------------------------------------------------------------------------
    @property
    def retry_count(self) -> int:
        return self._agg.failed_attempts

    @property
    def max_retries(self) -> int:
        return self._agg.max_retries

    def is_retry(self) -> bool:
        return self._agg.failed_attempts > 0

    def is_last_retry(self) -> bool:
        return self._agg.failed_attempts >= self._agg.max_retries

    # -- state ------------------------------------------------------------------------------
    async def get_state(self, key: str, default: Any = None) -> Any:
        value = self._agg.state.get(key, _MISSING)
        return default if value is _MISSING else copy.deepcopy(value)

    async def get_state_object(self) -> JSONObject:
        return copy.deepcopy(self._agg.state)

    async def set_state(self, key: str, value: Any) -> None:
        op = self._op("set_state")
        if self._match(op, f"set_state({key!r})", ev.StateSet, key) is None:
            self._agg.set_state(key, value, timestamp=self._recorder.now(), op=op)
            await self._recorder.record()

    async def update_state(self, values: Mapping[str, Any]) -> None:
        op = self._op("update_state")
        if self._match(op, "update_state()", ev.StateUpdated, None) is None:
            self._agg.update_state(values, timestamp=self._recorder.now(), op=op)
            await self._recorder.record()

    async def delete_state(self, key: str) -> None:
        op = self._op("delete_state")
        if self._match(op, f"delete_state({key!r})", ev.StateDeleted, key) is None:
            self._agg.delete_state(key, timestamp=self._recorder.now(), op=op)
            await self._recorder.record()

    # -- global scope ---------------------------------------------------------------------------
    async def get_global_state(self, key: str, default: Any = None) -> Any:
        """A value shared across executions (absent once its TTL passed); the read is recorded
        so a replay sees the same value."""
        return await get_global(self._recorder, key, default)

    async def set_global_state(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Share ``value`` across executions, optionally for ``ttl`` seconds."""
        await set_global(self._recorder, key, value, ttl)

    async def compare_and_set_global_state(
        self, key: str, expected: Any, value: Any, ttl: float | None = None
    ) -> bool:
        """Set ``key`` to ``value`` only if its current value is ``expected`` (None: absent),
        atomically across executions and processes; whether it was set. For counters,
        quotas and locks."""
        return await compare_and_set_global(self._recorder, key, expected, value, ttl)

    # -- checkpoints ------------------------------------------------------------------------
    async def create_checkpoint(
        self,
        metadata: Mapping[str, Any] | None = None,
        *,
        cursor: Any = None,
        items_processed: int | None = None,
        accumulated_results: Any = None,
    ) -> str:
        op = self._op("create_checkpoint")
        recorded = self._match(op, "create_checkpoint()", ev.CheckpointCreated, None)
        if isinstance(recorded, ev.CheckpointCreated):
            return recorded.checkpoint_id
        checkpoint_id = checkpoint_id_of(self.execution_id, op)
        self._agg.create_checkpoint(
            checkpoint_id,
            metadata=metadata,
            cursor=cursor,
            items_processed=items_processed,
            accumulated_results=accumulated_results,
            timestamp=self._recorder.now(),
            op=op,
        )
        await self._recorder.record()
        return checkpoint_id

    async def restore_from_checkpoint(self, checkpoint_id: str) -> None:
        self._agg.require_checkpoint(checkpoint_id)
        op = self._op("restore_from_checkpoint")
        attempted = f"restore_from_checkpoint({checkpoint_id!r})"
        if self._match(op, attempted, ev.CheckpointRestored, checkpoint_id) is None:
            self._agg.restore_checkpoint(checkpoint_id, timestamp=self._recorder.now(), op=op)
            await self._recorder.record()

    async def get_checkpoint_info(self, checkpoint_id: str) -> CheckpointInfo:
        self._agg.require_checkpoint(checkpoint_id)
        return next(c for c in checkpoints_of(self._agg) if c.id == checkpoint_id)

    async def get_all_checkpoints(self) -> list[CheckpointInfo]:
        return checkpoints_of(self._agg)

    @property
    def checkpoint(self) -> CheckpointInfo | None:
        """The latest checkpoint this execution created (also on a retry), or None."""
        latest = self._agg.latest_checkpoint_id
        if latest is None:
            return None
        return next(c for c in checkpoints_of(self._agg) if c.id == latest)

    def has_checkpoint(self) -> bool:
        return self._agg.latest_checkpoint_id is not None

    @property
    def checkpoint_cursor(self) -> JSON:
        cp = self.checkpoint
        return None if cp is None else cp.cursor

    @property
    def checkpoint_items_processed(self) -> int | None:
        cp = self.checkpoint
        return None if cp is None else cp.items_processed

    @property
    def accumulated_results(self) -> JSON:
        cp = self.checkpoint
        return None if cp is None else cp.accumulated_results

    # -- history and logging ------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        """Every history entry of the execution so far (the pending ones included).

        A run that started from a snapshot has not read the events before it: the first read
        of ``history`` there makes the worker read them and run the handler again from the
        top (operations recorded meanwhile are matched, as on any resume).
        """
        if self._recorder.history_from > 1:
            raise HistoryNeeded
        return history_of([*self._recorder.applied, *self._agg.pending_events])  # type: ignore[list-item]

    def add_history_entry(self, type: str, details: Mapping[str, Any] | None = None) -> None:
        """Record a history entry (committed with the next awaited operation)."""
        op = self._op("add_history_entry")
        if self._match(op, f"add_history_entry({type!r})", ev.HistoryEntryAdded, type) is None:
            self._agg.add_history_entry(type, details, timestamp=self._recorder.now(), op=op)

    def log(self, message: str, **metadata: Any) -> None:
        """Log through stdlib logging with the execution's ids bound; silent while replaying."""
        if self._recorder.replay.replaying:
            return
        a = self._agg
        _logger.info(
            message,
            extra={
                "execution_id": a.execution_id,
                "step_id": a.step_id,
                "attempt": a.next_attempt_number(),
                "metadata": metadata,
            },
        )

    # -- services ---------------------------------------------------------------------------
    def get_service(self, name: str) -> Any:
        return self._recorder.services.get(
            name, execution_id=self._agg.execution_id, step_id=self._agg.step_id
        )

    # -- durable sub-steps and recorded values -----------------------------------------------
    async def do(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        flush_first: bool = False,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``fn`` (sync or async) as the named sub-step; its result is recorded once.

        A result recorded in this or an earlier attempt is returned from the record without
        running ``fn``; a failure is recorded and raised as SubStepFailedError (a retry of
        the step runs it again). The body runs at least once: make its side effects
        idempotent with ``ctx.idempotency_key`` (stable across crashes and retries).

        The result (or failure) is durable before ``do`` returns (or raises), with everything
        the handler recorded before it. ``flush_first=True`` also commits what is buffered
        before the body starts, so observers see the state a long body runs from.

        ``retry=RetryPolicy(...)`` runs a failing body again in place, each failed try
        recorded and each backoff resumable after a crash; ``timeout`` bounds each try
        (see engine/substep_policy.py). The last failure is the sub-step's, with its tries.
        """
        return await run_substep(
            self._recorder,
            self._do_names,
            name,
            fn,
            flush_first=flush_first,
            retry=retry,
            timeout=timeout,
        )

    async def transaction(self, name: str, body: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``body(conn)`` in a transaction of the backend's database that commits
        together with the step's record of its result (PostgreSQL only: ``conn`` is an
        async psycopg connection). The rows it writes and the recorded result are durable
        together, exactly once; a replay returns the result without running ``body``; a
        body that raises leaves no rows and raises SubStepFailedError as ``ctx.do`` does.
        ``name`` shares the ``ctx.do`` names. See :mod:`stepsource.engine.transactions`."""
        if not isinstance(name, str) or not name:
            raise UsageError("ctx.transaction needs a non-empty str name", **self._recorder.where())
        return await run_transaction(self._recorder, self.do, name, body)

    async def flush(self) -> None:
        """Make everything recorded so far durable now (state, checkpoints, history entries
        are otherwise buffered until the next side-effect boundary)."""
        await self._recorder.commit()

    async def patched(self, change_id: str) -> bool:
        """Whether this execution takes the path of the code change ``change_id``.

        True for an execution that reaches this call with the new code (recorded once, and
        True from then on, retries included); False when replaying one whose record shows it
        passed this point before the change. Matched by the change id, not by position: the
        call shifts no operation after it. Once no execution older than the change can still
        replay through this point, delete the old branch (the call may stay).
        """
        if not isinstance(change_id, str) or not change_id:
            raise UsageError(
                "ctx.patched needs a non-empty str change id", **self._recorder.where()
            )
        replay = self._recorder.replay
        if change_id in self._agg.patches or replay.recorded_patch(change_id):
            return True
        if replay.replaying_ahead():
            return False  # the old code recorded what comes after this point
        # live from here (a query's or verify's replay stops): the rest of the log is folded
        # in first, so the mark is appended after it (a resume after a crash)
        replay.finish_replay()
        op = self._recorder.closing_op(SCOPE.get())  # seq -1: matched by its change id
        self._agg.mark_patch(change_id, timestamp=self._recorder.now(), op=op)
        await self._recorder.commit()  # durable before anything the new path records
        return True

    @property
    def substep_try(self) -> int:
        """Inside a ``ctx.do`` body: the number of the running try (1 = the first, counted
        in this attempt from the record, so a resumed attempt goes on counting); 0 outside."""
        scope = SCOPE.get()
        return tries_of(self._recorder, scope) if scope else 0

    @property
    def idempotency_key(self) -> str:
        """``<execution id>/<ctx.do name>`` inside a ctx.do body; the execution id outside."""
        scope = SCOPE.get()
        return f"{self._agg.execution_id}/{scope}" if scope else self._agg.execution_id

    async def _value(self, kind: str, make: Callable[[OpCoordinates], Any]) -> Any:
        op = self._op(kind)
        recorded = self._match(op, f"ctx.{kind}()", ev.ValueRecorded, kind)
        if isinstance(recorded, ev.ValueRecorded):
            return recorded.value
        value = make(op)
        self._agg.record_value(kind, value, timestamp=self._recorder.now(), op=op)
        await self._recorder.commit()
        return value

    async def now(self) -> datetime:
        """The current UTC time, recorded: a replay returns the same instant."""
        text = await self._value("now", lambda _op: self._recorder.now().isoformat())
        return datetime.fromisoformat(str(text))

    async def random(self) -> float:
        """A random float in [0, 1), recorded: a replay returns the same number."""
        entropy = self._recorder.runtime.entropy
        value = await self._value("random", lambda op: entropy.random(self.execution_id, op))
        return float(value)

    async def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded: a replay returns the same one."""
        entropy = self._recorder.runtime.entropy
        value = await self._value(
            "uuid4", lambda op: str(entropy.uuid4("uuid4", self.execution_id, op))
        )
        return uuid.UUID(str(value))

    # -- waiting --------------------------------------------------------------------------------
    def _deadline(self, seconds: float | None, what: str) -> int | None:
        """When a sleep or a wait's timeout ends (ms), or None for a wait without one."""
        if seconds is None and what == "timeout":
            return None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (0 <= seconds < MAX_WAIT_SECONDS)
        ):
            raise UsageError(
                f"{what} must be a number of seconds from 0 to 10**9 (about 31 years), "
                f"not {seconds!r}",
                execution_id=self._agg.execution_id,
                step_id=self._agg.step_id,
                hint="Leave the timeout out (None) to wait without one"
                if what == "timeout"
                else None,
            )
        return self._recorder.runtime.clock.now_ms() + int(seconds * 1000)

    def _timed_out(self, what: str) -> WaitTimeout:
        return WaitTimeout(
            f"{what} timed out",
            execution_id=self._agg.execution_id,
            step_id=self._agg.step_id,
            hint="The timeout is recorded; catch WaitTimeout to carry on another way",
        )

    async def sleep(self, seconds: float) -> None:
        """Wait durably: the execution is suspended (holding no worker) until the timer fires."""
        fire_at = self._deadline(seconds, "sleep")
        op = self._op("sleep")
        recorded = self._match(op, "sleep()", ev.TimerStarted, None)
        if isinstance(recorded, ev.TimerStarted):
            fire_at = recorded.fire_at_ms
        else:
            assert fire_at is not None
            self._agg.start_timer(float(seconds), fire_at, timestamp=self._recorder.now(), op=op)
            await self._recorder.commit()
        assert fire_at is not None
        due = fire_at

        async def fired() -> Outcome:
            return (ev.TimerFired, {}) if self._recorder.runtime.clock.now_ms() >= due else None

        await wait(self._recorder, op, "sleep", fired, due, kind="sleep")

    async def _await(
        self, name: str, kind: str, timeout: float | None, check: Callable[[], Any]
    ) -> ev.WaitEnded:
        timeout_at = self._deadline(timeout, "timeout")
        op = self._op(f"wait_for_{kind}")
        recorded = self._match(op, f"wait_for_{kind}({name!r})", ev.EventAwaited, None)
        if isinstance(recorded, ev.EventAwaited):
            timeout_at = recorded.timeout_at_ms
        else:
            self._agg.await_event(name, kind, timeout_at, timestamp=self._recorder.now(), op=op)
            await self._recorder.commit()
        return await wait(self._recorder, op, f"{kind} {name}", check, timeout_at, kind=kind)

    async def wait_for_event(self, name: str, timeout: float | None = None) -> Any:
        """Suspend until a client sends event ``name`` (``handle.send_event``); its payload.

        An event sent before the wait is kept and consumed by the first wait for it. On
        timeout, WaitTimedOut is recorded and WaitTimeout raised.
        """

        check_name(name, "an event name", self._agg.limits, **self._recorder.where())

        async def arrived() -> Outcome:
            for event in self._agg.unconsumed_events:
                if event["name"] == name:
                    fields = {"received_version": event["version"], "value": event["payload"]}
                    return (ev.WaitSatisfied, fields)
            return None

        ended = await self._await(name, "event", timeout, arrived)
        if isinstance(ended, ev.WaitTimedOut):
            raise self._timed_out(f"wait_for_event({name!r})")
        assert isinstance(ended, ev.WaitSatisfied)
        return copy.deepcopy(ended.value)

    async def wait_for_condition(
        self, predicate: Callable[[], Any], timeout: float | None = None
    ) -> None:
        """Suspend until ``predicate()`` (sync or async) is true; it is checked when the
        execution wakes (a signal, update or event arrives, or the timeout passes)."""
        if not callable(predicate):
            raise UsageError(
                "wait_for_condition() needs a function that says whether to go on, not "
                f"{with_article(type(predicate).__name__)}",
                hint="Pass a function, e.g. lambda: approved (sync or async)",
                **self._recorder.where(),
            )

        async def holds() -> Outcome:
            result = await self._reading("a wait_for_condition predicate", predicate)
            return (ev.WaitSatisfied, {"received_version": None, "value": None}) if result else None

        ended = await self._await("condition", "condition", timeout, holds)
        if isinstance(ended, ev.WaitTimedOut):
            raise self._timed_out("wait_for_condition()")

    # -- child steps ----------------------------------------------------------------------------
    async def start_step(
        self,
        step_id: str,
        input: Mapping[str, Any] | None = None,
        *,
        optional: bool | None = None,
    ) -> ChildHandle:
        """Start a child execution now (its records point back here); await its ``result()``
        later, so several children run in parallel. Replays never start it twice."""
        return await start_child(self._recorder, step_id, input, optional=optional)

    async def run_step(
        self,
        step_id: str,
        input: Mapping[str, Any] | None = None,
        *,
        optional: bool | None = None,
    ) -> Any:
        """Run a child execution and return its result, durably (memoized on replay)."""
        child = await self.start_step(step_id, input, optional=optional)
        return await child.result()

    def saga(self, name: str = "saga") -> Saga:
        """Record compensations as the flow progresses; run them in reverse on failure
        (engine/sagas.py). A saga's name is unique in an attempt of the step."""
        where = self._recorder.where()
        name = check_saga_name(name, "a saga's name", where, also="#")
        if name in self._saga_names:
            raise UsageError(
                f"ctx.saga({name!r}) was already used in this attempt",
                hint="Give each saga of a handler its own name, e.g. ctx.saga('payment')",
                **where,
            )
        self._saga_names.add(name)
        return Saga(self, name, done_earlier=self._done_earlier, where=where)

    def _done_earlier(self, name: str) -> bool:
        """Whether ``ctx.do(name)`` completed in an earlier attempt of this step."""
        recorded = self._agg.substeps.get(name)
        if recorded is None or not recorded["ok"]:
            return False
        attempt = recorded.get("attempt")
        return isinstance(attempt, int) and attempt < self._agg.attempt

    # -- message handlers -----------------------------------------------------------------------
    def on_signal(self, name: str, fn: Callable[[Any], Any]) -> None:
        """Run ``fn(payload)`` (sync or async) for each signal ``name``, at wait points."""
        self._recorder.signal_handlers[self._message_handler("signal", name, fn)] = fn

    def on_query(self, name: str, fn: Callable[..., Any]) -> None:
        """Answer ``handle.query(name, *args)`` with ``fn(*args)``: it reads, never records."""
        self._recorder.query_handlers[self._message_handler("query", name, fn)] = fn

    def on_update(self, name: str, fn: Callable[..., Any]) -> None:
        """Run ``fn(*args)`` for ``handle.update(name, *args)``; its result is recorded."""
        self._recorder.update_handlers[self._message_handler("update", name, fn)] = fn

    def _message_handler(self, kind: str, name: object, fn: object) -> str:
        """``name``, checked as a client's message names are, with a callable ``fn``: a
        mistake here is refused at once, not when the first message arrives."""
        where = self._recorder.where()
        checked = check_name(name, f"the {kind} name", self._agg.limits, **where)
        if not callable(fn):
            raise UsageError(
                f"ctx.on_{kind}({name!r}, ...) needs a function, not "
                f"{with_article(type(fn).__name__)}",
                hint=f"Pass the function that handles each {kind} (sync or async)",
                **where,
            )
        return checked

    async def answer_query(self, name: str, args: tuple[Any, ...]) -> Any:
        handlers = self._recorder.query_handlers
        handler = handlers.get(name)
        if handler is None:
            raise UnknownQueryError(
                f"the handler registered no query named {name!r} "
                f"(registered: {', '.join(sorted(handlers)) or 'none'})",
                execution_id=self._agg.execution_id,
                step_id=self._agg.step_id,
            )
        return await self._reading("a query handler", handler, *args)

    async def _reading(self, who: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` (sync or async) with recording refused: ``who`` reads only."""
        recorder = self._recorder
        outer, recorder.reading = recorder.reading, who
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
        finally:
            recorder.reading = outer
        return result

    # -- lifecycle ----------------------------------------------------------------------------
    async def complete(self, details: Mapping[str, Any] | None = None) -> None:
        """Mark success; the one StepCompleted is written when the handler returns."""
        self._agg.mark_complete(details)

    async def continue_as_new(self, input: Mapping[str, Any] | None = None) -> NoReturn:
        """End this run and start a fresh execution of this step with ``input`` (its log
        empty), then unwind the handler: a long-lived loop never replays a growing log.
        Handles of this run follow to the new one (:mod:`stepsource.engine.continuation`)."""
        await continue_as_new(self._recorder, input)

    async def fail(self, reason: str, details: Mapping[str, Any] | None = None) -> None:
        """Record StepFailed (terminal, never retried) and unwind the handler."""
        op = self._op("fail")
        if self._match(op, f"fail({reason!r})", ev.StepFailed, None) is None:
            self._agg.fail(
                reason, details, error_type="fail", timestamp=self._recorder.now(), op=op
            )
            await self._recorder.commit(final=True)
        raise StepFailedError(
            f"the handler called fail(): {reason}",
            execution_id=self._agg.execution_id,
            step_id=self._agg.step_id,
        )
