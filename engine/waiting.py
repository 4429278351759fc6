"""Waiting without holding a worker, and client messages delivered at wait points.

A wait (``sleep``, ``wait_for_event``, ``wait_for_condition``) is one recording operation.
While the log already holds what happened after it, the re-run handler consumes that record:
messages are delivered to their handlers again (their operations matched) until the wait's
recorded end. Live, the actor moves the execution's inbox into the stream (signals, events,
updates, a cancellation), delivers them, then either ends the wait (recording why) or
*suspends*: it records StepSuspended, requeues the execution for its wake-up time and gives
up the lease; the handler unwinds and no task or aggregate stays in memory. Waking up is a
replay like any resume.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from stepsource.adapters.ports import Commit
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import OpCoordinates
from stepsource.aggregates.values import error_text
from stepsource.engine.failures import Unwinding
from stepsource.engine.interceptors import WaitInfo, hooked, intercept
from stepsource.engine.recorder import Recorder
from stepsource.engine.scope import CONTROL_FLOW, SCOPE
from stepsource.errors import LimitExceededError, StateValueError

__all__ = ["Cancelled", "Outcome", "Suspended", "deliver_at_end", "message_payload", "wait"]

_logger = logging.getLogger("stepsource.step")

Outcome = tuple[type[ev.WaitEnded], dict[str, Any]] | None
"""What ends a wait now (the event class and its fields), or None to keep waiting."""


class Suspended(Unwinding):
    """Unwinds a handler whose wait cannot end now; the actor records the suspension."""

    def __init__(self, reason: str, wake_at_ms: int | None) -> None:
        super().__init__(reason, wake_at_ms)
        self.reason = reason
        self.wake_at_ms = wake_at_ms


class Cancelled(Unwinding):
    """Unwinds a handler whose execution was cancelled (StepCancelled already recorded)."""


def message_payload(recorder: Recorder, item_data: bytes) -> dict[str, Any]:
    data = orjson.loads(recorder.runtime.store.codec.open(item_data))
    assert isinstance(data, dict)
    return data


async def wait(
    recorder: Recorder,
    op: OpCoordinates,
    reason: str,
    check: Callable[[], Awaitable[Outcome]],
    wake_at_ms: int | None,
    *,
    timeout: bool = True,
    kind: str = "event",
) -> ev.WaitEnded:
    """Run the wait at ``op`` to its end (recorded or live), or raise Suspended.

    ``wake_at_ms`` is when to look again; with ``timeout`` the wait ends then (WaitTimedOut),
    without it the execution only wakes up to check again.
    """
    scope, seq = op[1], op[2]
    while (recorded := recorder.replay.next_for_wait(scope, seq)) is not None:
        if isinstance(recorded, ev.WaitEnded):
            return recorded
        await deliver(recorder, recorded)
    recorder.replay.finish_replay()
    live = functools.partial(
        _live, recorder, scope, seq, reason, check, wake_at_ms, timeout, kind == "child"
    )
    interceptors = hooked(recorder.runtime.interceptors, "wait")
    if not interceptors:
        return await live()
    aggregate = recorder.aggregate
    info = WaitInfo(
        execution_id=aggregate.execution_id,
        step_id=aggregate.step_id,
        attempt=aggregate.next_attempt_number(),
        kind=kind,
        name=reason,
        wake_at_ms=wake_at_ms,
    )
    return await intercept(interceptors, "wait", info, live)


async def _live(
    recorder: Recorder,
    scope: str,
    seq: int,
    reason: str,
    check: Callable[[], Awaitable[Outcome]],
    wake_at_ms: int | None,
    timeout: bool,
    nudged: bool = False,
) -> ev.WaitEnded:
    """The wait after its record: deliver what the inbox holds, then end it or suspend.
    ``nudged``: a wait for children, which post an item to wake it as they end."""
    for message in await pull_inbox(recorder):
        await deliver(recorder, message)
    outcome = await check()
    now_ms = recorder.runtime.clock.now_ms()
    if outcome is None and timeout and wake_at_ms is not None and now_ms >= wake_at_ms:
        outcome = (ev.WaitTimedOut, {})
    if outcome is None:
        raise Suspended(reason, wake_at_ms)
    event_class, fields = outcome
    consumed: list[int] = []
    if nudged:  # a child that ended since the inbox was read left its wake-up item there
        items = await recorder.runtime.store.backend.inbox(recorder.execution_id)
        consumed = [item.id for item in items if item.kind == "child"]
    recorder.aggregate.end_wait(event_class, scope, seq, timestamp=recorder.now(), **fields)
    await recorder.commit(consumed=consumed)
    ended = recorder.applied[-1]
    assert isinstance(ended, ev.WaitEnded)
    return ended


async def pull_inbox(recorder: Recorder) -> list[ev.Message]:
    """Move the execution's inbox into its stream; raise Cancelled on a cancellation."""
    aggregate = recorder.aggregate
    backend = recorder.runtime.store.backend
    items = await backend.inbox(aggregate.execution_id)
    if not items:
        return []
    consumed = [item.id for item in items]
    # an item already moved into the stream (its deletion was not atomic with that commit on
    # some backends) is only deleted again, never recorded twice
    fresh = [
        item for item in items if item.id > aggregate.last_inbox_id and item.kind != "child"
    ]  # a "child" item only wakes the parent: the child's outcome is read from its own log
    now = recorder.now()
    for item in fresh:
        data = message_payload(recorder, item.data)
        if item.kind == "cancel":
            aggregate.cancel(str(data.get("reason", "cancelled")), timestamp=now)
            await recorder.commit(final=True, consumed=consumed)
            raise Cancelled
        if item.kind in ("signal", "event"):
            message = ev.SignalReceived if item.kind == "signal" else ev.EventReceived
            aggregate.receive(
                message,
                inbox_id=item.id,
                name=item.name,
                timestamp=now,
                payload=data.get("payload"),
            )
        elif item.kind == "update":
            aggregate.receive(
                ev.UpdateAccepted,
                inbox_id=item.id,
                name=item.name,
                timestamp=now,
                update_id=str(data["update_id"]),
                args=list(data.get("args", [])),
            )
    before = len(recorder.applied)
    if not fresh:  # an empty commit deletes them, guarded by version and lease like any other
        await backend.append(
            Commit(
                stream_id=aggregate.execution_id,
                expected_version=aggregate.version - len(aggregate.pending_events),
                events=(),
                consumed=tuple(consumed),
                lease_owner=recorder.worker_id,
            )
        )
        return []
    await recorder.commit(consumed=consumed)
    return [e for e in recorder.applied[before:] if isinstance(e, ev.Message)]


async def deliver_at_end(recorder: Recorder) -> None:
    """The end of a handler that registered signal or update handlers is its last wait
    point: the messages recorded after its last wait are delivered again on a re-run, and,
    live, the signals and updates still in the inbox are moved into the stream and delivered
    before the end is recorded (one sent while the last ``ctx.do`` ran stayed in the inbox,
    never delivered, without a word). A handler without them reads no inbox here."""
    if not (recorder.signal_handlers or recorder.update_handlers):
        return
    replay = recorder.replay
    while (recorded := replay.next_message()) is not None:
        await deliver(recorder, recorded)
    if replay.read_only or replay.leftover() is not None or recorder.aggregate.marked_complete:
        # a query or a verification reads the record only; a re-run that ended before an
        # operation it recorded diverged, which recording its end reports; a handler that
        # called ctx.complete() takes no more messages
        return
    backend = recorder.runtime.store.backend
    while True:  # and what came while those ran
        kinds = {item.kind for item in await backend.inbox(recorder.execution_id)}
        if "cancel" in kinds or not kinds & {"signal", "update"}:
            return  # a cancel does not undo a handler that returned: it completes
        replay.finish_replay()  # what comes next is recorded live, as after a wait
        for message in await pull_inbox(recorder):
            await deliver(recorder, message)


async def deliver(recorder: Recorder, message: ev.Message) -> None:
    """Run the handler registered for a message (its operations recorded or matched)."""
    if isinstance(message, ev.SignalReceived):
        handler = recorder.signal_handlers.get(message.name)
        if handler is None:
            _logger.warning("no signal handler for %r; the signal is recorded only", message.name)
            return
        await _call_in_scope(f"signal#{message.originator_version}", handler, message.payload)
    elif isinstance(message, ev.UpdateAccepted):
        await _run_update(recorder, message)


async def _run_update(recorder: Recorder, message: ev.UpdateAccepted) -> None:
    handler = recorder.update_handlers.get(message.name)
    ok, result, error = True, None, None
    if handler is None:
        registered = ", ".join(sorted(recorder.update_handlers)) or "none"
        ok, error = False, f"no update handler named {message.name!r} (registered: {registered})"
    else:
        try:
            result = await _call_in_scope(
                f"update#{message.originator_version}", handler, *message.args
            )
        except CONTROL_FLOW:
            raise
        except Exception as exc:  # noqa: BLE001 - an update's own failure is its recorded result
            ok, error = (
                False,
                f"{type(exc).__name__}: {error_text(exc, about=recorder.execution_id)}",
            )
    if recorder.replay.find_update_completion(message.update_id) is not None:
        return
    recorder.replay.finish_replay()
    now = recorder.now()
    try:
        recorder.aggregate.complete_update(
            message.update_id, ok=ok, result=result, error=error, timestamp=now
        )
    except (StateValueError, LimitExceededError) as exc:  # a result the log cannot hold
        # fails the update, as the handler's own exception would, not the execution
        recorder.aggregate.complete_update(
            message.update_id,
            ok=False,
            result=None,
            error=f"{type(exc).__name__}: {exc.reason}",
            timestamp=now,
        )
    await recorder.commit()
    recorder.runtime.on_change(recorder.aggregate.execution_id)


async def _call_in_scope(scope: str, fn: Callable[..., Any], *args: Any) -> Any:
    token = SCOPE.set(scope)
    try:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result
    finally:
        SCOPE.reset(token)
