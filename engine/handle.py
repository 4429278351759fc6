"""Client handles: attach to an execution by id, await its result, describe it."""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import orjson

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSON, Limits, to_json, with_article
from stepsource.engine.arguments import check_name, check_size, check_timeout
from stepsource.engine.clock import Clock
from stepsource.engine.continuation import latest_run, run_id
from stepsource.engine.encrypted_log import require_key
from stepsource.engine.failures import bounded_text
from stepsource.engine.interceptors import Interceptor, MessageInfo, hooked, intercept
from stepsource.engine.notify import Notifier
from stepsource.engine.querying import run_query
from stepsource.engine.results import validate_output
from stepsource.engine.runtime import Runtime
from stepsource.engine.store import ExecutionStore
from stepsource.engine.unattended import unattended_hint
from stepsource.errors import (
    BackendUnavailableError,
    ResultTimeout,
    StepCancelledError,
    StepFailedError,
    UnknownExecutionError,
    UpdateFailedError,
    UsageError,
)
from stepsource.projections.folds import record_of
from stepsource.projections.models import StepRecord

if TYPE_CHECKING:
    from stepsource.engine.results import OutputType

__all__ = ["ClientServices", "ExecutionHandle", "message_body"]

_MAX_POLL = 0.5
#: how long a message sent to a run continuing as new waits for it to end (seconds)
_STRANDED_WAIT = 10.0
_ENDED = (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)

T = TypeVar("T")
M = TypeVar("M")


def message_body(
    kind: str, name: str, data: dict[str, Any], limits: Limits, where: dict[str, Any]
) -> bytes:
    """The stored body of a message (``kind``: signal, event, update, cancel) named ``name``
    with ``data``, or the error a client gets for it before anything is sent or started."""
    check_name(name, f"{with_article(kind)} name", limits, **where)
    body = {  # each part named as the caller passed it ("the signal's payload is ...")
        key: to_json(
            value,
            what=f"the {kind}'s {'arguments' if key == 'args' else key.replace('_', ' ')}",
            limits=limits,
            **where,
        )
        for key, value in data.items()
    }
    return check_size(orjson.dumps(body), f"the {kind}'s payload", limits, **where)


@dataclass(frozen=True)
class ClientServices:
    """What a handle uses of its engine."""

    store: ExecutionStore
    clock: Clock
    #: wakes this process's workers (a message was posted)
    work: Notifier
    #: notified on every change an actor of this process records
    changes: Notifier
    #: whether this process's pool runs the execution now
    runs_here: Callable[[str], bool]
    #: the services a query's read-only replay runs with
    runtime: Callable[[], Runtime]
    #: the engine's interceptors (``message`` wraps what a handle sends)
    interceptors: tuple[Interceptor, ...] = ()


class ExecutionHandle(Generic[T]):
    """A reference to one execution. Cheap to create; every call reads the log.

    ``T`` is what ``result()`` returns: JSON data, or the handler's return type for a handle
    from ``engine.start(handler, ...)`` (see :mod:`stepsource.engine.results`).
    """

    def __init__(
        self,
        services: ClientServices,
        execution_id: str,
        *,
        step_id: str | None = None,
        output: OutputType = None,
    ) -> None:
        self._services = services
        self._output = output
        self.execution_id = execution_id
        self._next_version = 1
        self._step_id = step_id
        self._terminal: ev.ExecutionEvent | None = None
        # a handle from engine.start: the execution exists, an actor of this engine wakes it
        # on every change it records (wake) and hands over its terminal event once durable
        # (ended_here)
        self._started_here = step_id is not None
        self._changed_event: anyio.Event | None = None
        self._last_read = time.monotonic()
        #: the backend could not be read at the last look (a restart, an outage): result()
        #: goes on looking until its timeout, then raises this rather than ResultTimeout
        self._outage: BackendUnavailableError | None = None

    def ended_here(self, terminal: ev.ExecutionEvent) -> None:
        """Told by an actor of this process that the execution ended (durably)."""
        self._terminal = terminal
        self.wake()

    def wake(self) -> None:
        """Told by an actor of this process that the execution changed."""
        event, self._changed_event = self._changed_event, None
        if event is not None:
            event.set()

    async def _changed(self, delay: float) -> None:
        """Wait for a change of this execution in this process, or ``delay`` seconds."""
        if not self._started_here:
            await self._services.changes.wait(delay)
            return
        if self._changed_event is None:
            self._changed_event = anyio.Event()
        event = self._changed_event
        with anyio.move_on_after(delay):
            await event.wait()

    async def _await_terminal(self) -> None:
        """Wait until this handle knows the execution's terminal event (``_terminal``)."""
        delay = 0.01
        look = not self._started_here  # just started: nothing to read yet
        while self._terminal is None:
            if look and self._worth_reading():
                try:
                    if await self._poll():
                        return
                except BackendUnavailableError as error:
                    self._outage = error  # the server restarts, say: look again later
                else:
                    self._outage = None
            look = True
            await self._changed(delay)
            delay = min(delay * 2, _MAX_POLL)

    async def _parked(self) -> str | None:
        """Why the execution is parked (its open attempt cannot resume), or None."""
        aggregate, _ = await self._services.store.load(self.execution_id, aggregate_only=True)
        return aggregate.parked

    def _worth_reading(self) -> bool:
        """Whether to read the log now: while this engine's own actor runs the execution it
        reports every change in memory, so the log is read only every ``_MAX_POLL`` seconds
        (another worker may have taken the execution over meanwhile)."""
        if not (self._started_here and self._services.runs_here(self.execution_id)):
            return True
        return time.monotonic() - self._last_read >= _MAX_POLL

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.execution_id!r})"

    async def _poll(self, *, whole: bool = False) -> ev.ExecutionEvent | None:
        """Look at what the execution appended since the last look; its terminal event, if
        any.

        A look reads the stream's last version and, if it moved, only the last event (and the
        first, at the first look, for the step's id): an ending is always the last event, so
        a handle waiting on a long execution reads two events per look, not every event
        appended since the one before. With ``whole`` (before a message is sent) it reads
        every event since the last look, so a damaged log is reported to the sender.
        """
        self._last_read = time.monotonic()
        store = self._services.store
        if not whole:
            last = await store.backend.stream_version(self.execution_id)
            if last == 0 and self._next_version == 1:
                raise UnknownExecutionError(
                    "no such execution in this backend",
                    execution_id=self.execution_id,
                    hint="Check the id and the backend URL (--url or STEPSOURCE_URL)",
                )
            events: list[ev.ExecutionEvent] = []
            if self._next_version == 1:
                events = await store.events(self.execution_id, 1, 1)
            if last >= max(self._next_version, 2):
                events += await store.events(self.execution_id, last, last)
            self._next_version = max(self._next_version, last + 1)
        else:
            start = self._next_version
            events = await store.events(self.execution_id, start)
            if not events and start == 1:
                raise UnknownExecutionError(
                    "no such execution in this backend",
                    execution_id=self.execution_id,
                    hint="Check the id and the backend URL (--url or STEPSOURCE_URL)",
                )
            # looks made at once (messages sent together) read the same events: each moves
            # the next version to past what it read, never by what it read (that overshot
            # the log's end, and a later look never read the terminal event)
            self._next_version = max(self._next_version, start + len(events))
        for event in events:
            if isinstance(event, ev.StepScheduled):
                self._step_id = event.step_id
            if isinstance(event, (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)):
                self._terminal = event
        return self._terminal

    @overload
    async def result(self, timeout: float | None = None) -> T: ...
    @overload
    async def result(self, timeout: float | None = None, *, type: type[M]) -> M: ...
    async def result(self, timeout: float | None = None, *, type: Any = None) -> Any:
        """The recorded output once the execution completes: JSON data, validated into
        ``type`` when given (or into the handler's return annotation for a handle from
        ``engine.start(handler, ...)``); OutputValidationError if it does not fit.

        Raises StepFailedError if it failed, StepCancelledError if it was cancelled, and
        ResultTimeout if ``timeout`` seconds pass first (the execution goes on).
        """
        check_timeout(timeout, execution_id=self.execution_id, step_id=self._step_id)
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        run: ExecutionHandle[Any] = self
        left = timeout
        while True:
            try:
                terminal = await run._recorded_output(left)
            except ResultTimeout as late:
                if run is self:
                    raise
                raise ResultTimeout(  # the caller's timeout and execution, and the run it reached
                    f"the execution did not finish within {timeout} seconds (it continued as "
                    f"new; its latest run is {run.execution_id})",
                    execution_id=self.execution_id,
                    step_id=self._step_id,
                    hint=late.hint,
                ) from None
            if not isinstance(terminal, ev.StepContinued):
                break
            # the run continued as a new one (ctx.continue_as_new): its outcome is the chain's
            latest = await latest_run(self._services.store, terminal.successor)
            run = ExecutionHandle(self._services, latest, step_id=None)
            left = None if timeout is None else max(0.0, deadline - anyio.current_time())
        output = terminal.output
        into = type if type is not None else self._output
        if into is None:
            return output
        return validate_output(output, into, execution_id=self.execution_id, step_id=self._step_id)

    async def _recorded_output(self, timeout: float | None) -> ev.StepCompleted:
        if timeout is None:  # no cancel scope to enter and leave on every call
            await self._await_terminal()
        else:
            with anyio.move_on_after(timeout):
                await self._await_terminal()
        terminal = self._terminal
        if terminal is None and self._outage is not None:
            raise self._outage  # the reason it could not tell, not a timeout
        if terminal is None:
            unattended = await unattended_hint(self._services.store.backend, self._step_id)
            parked = None if unattended else await self._parked()
            hint = "It goes on running; call result() again or raise the timeout"
            if unattended:
                hint = "It goes on waiting; call result() again once a worker runs the step"
            elif parked:
                hint = (
                    "Nothing runs it until a handler that can resume it is deployed, or "
                    "`stepsource release ID` once the cause outside the code is fixed"
                )
            raise ResultTimeout(
                f"the execution did not finish within {timeout} seconds"
                + (f": {unattended}" if unattended else "")
                + (f": it is parked ({bounded_text(parked, 300)})" if parked else ""),
                execution_id=self.execution_id,
                step_id=self._step_id,
                hint=hint,
            )
        if isinstance(terminal, ev.StepFailed):
            raise StepFailedError(
                f"the step failed: {terminal.reason}",
                execution_id=self.execution_id,
                step_id=self._step_id,
            )
        if isinstance(terminal, ev.StepCancelled):
            raise StepCancelledError(
                f"the execution was cancelled: {terminal.reason}",
                execution_id=self.execution_id,
                step_id=self._step_id,
            )
        assert isinstance(terminal, ev.StepCompleted)
        return terminal

    async def _post(self, kind: str, name: str, data: dict[str, Any]) -> None:
        limits = self._services.store.limits
        where = {"execution_id": self.execution_id, "step_id": self._step_id}
        sealed = message_body(kind, name, data, limits, where)
        await require_key(
            self._services.store,
            f"the {kind} would be stored in clear, where the workers cannot read it",
        )
        terminal = await self._poll(whole=True)
        if isinstance(terminal, ev.StepContinued):  # the message goes to the chain's last run
            target = await latest_run(self._services.store, terminal.successor)
            latest: ExecutionHandle[Any] = ExecutionHandle(self._services, target)
            await latest._post(kind, name, data)
            return
        if terminal is not None:
            what = "cancel it" if kind == "cancel" else f"send {kind} {name!r}"
            raise UsageError(
                f"cannot {what}: the execution already ended",
                execution_id=self.execution_id,
                step_id=self._step_id,
                hint="Messages go to running or waiting executions only",
            )
        services = self._services

        posted: list[int] = []

        async def send() -> None:
            item = await services.store.backend.post(
                self.execution_id,
                kind,
                name,
                services.store.codec.seal(sealed),  # encrypted at rest like the log
                services.clock.now_ms(),
            )
            posted.append(item)

        chain = hooked(services.interceptors, "message")
        if chain:
            info = MessageInfo(self.execution_id, self._step_id, kind, name)
            await intercept(chain, "message", info, send)
        else:
            await send()
        services.work.notify()
        if posted:
            await self._resend_if_stranded(posted[0], kind, name, data)

    async def _resend_if_stranded(
        self, item_id: int, kind: str, name: str, data: dict[str, Any]
    ) -> None:
        """The run this message was posted to may be continuing as new (ctx.continue_as_new
        starts the successor, reads its inbox, then ends, handing what it read over): a
        message posted after that read stays in the ended run's inbox, so it goes to the
        chain's last run. A run whose successor does not exist yet reads it later."""
        store = self._services.store
        first = await store.events(self.execution_id, 1, 1)
        if not first or not isinstance(first[0], ev.StepScheduled):
            return
        root = first[0].chain_root or self.execution_id
        if await store.backend.stream_version(run_id(root, first[0].chain_run + 1)) == 0:
            return  # not continuing: it takes the message, or hands it over as it ends
        end: ev.ExecutionEvent | None = None
        with anyio.move_on_after(_STRANDED_WAIT):  # a crashed run hands it over on resuming
            while not isinstance(end, _ENDED):
                last = await store.backend.stream_version(self.execution_id)
                (end,) = await store.events(self.execution_id, last, last)
                if not isinstance(end, _ENDED):
                    await anyio.sleep(0.02)
        if not isinstance(end, ev.StepContinued):
            return
        items = await store.backend.inbox(self.execution_id, after_id=item_id - 1, limit=1)
        if items and items[0].id == item_id:  # not handed over: send it on
            target = await latest_run(store, end.successor)
            latest: ExecutionHandle[Any] = ExecutionHandle(self._services, target)
            await latest._post(kind, name, data)

    async def signal(self, name: str, payload: Any = None) -> None:
        """Send a signal: recorded as SignalReceived and handled by ``ctx.on_signal(name, fn)``."""
        await self._post("signal", name, {"payload": payload})

    async def send_event(self, name: str, payload: Any = None) -> None:
        """Send an event: ``ctx.wait_for_event(name)`` returns its payload."""
        await self._post("event", name, {"payload": payload})

    async def cancel(self, reason: str = "cancelled") -> None:
        """Ask for cancellation: StepCancelled is recorded when the execution next wakes or
        reaches a wait point, and ``result()`` then raises StepCancelledError."""
        await self._post("cancel", "cancel", {"reason": str(reason)})

    async def update(self, name: str, *args: Any, timeout: float | None = None) -> JSON:
        """Run the handler's ``ctx.on_update(name, fn)`` with ``args``; its recorded result."""
        check_timeout(timeout, execution_id=self.execution_id, step_id=self._step_id)
        if isinstance(await self._poll(), ev.StepContinued):  # to the chain's last run
            latest = await latest_run(self._services.store, self.execution_id)
            return await ExecutionHandle(self._services, latest).update(
                name, *args, timeout=timeout
            )
        update_id = str(uuid.uuid4())
        await self._post("update", name, {"update_id": update_id, "args": list(args)})
        delay = 0.01
        run: ExecutionHandle[Any] = self  # the run that holds the update now
        seen = 1  # read only what was appended since the last look
        with contextlib.nullcontext() if timeout is None else anyio.move_on_after(timeout):
            while True:
                # the end is looked for before the events are read, so that an update
                # answered just before the end is among them
                ended = run._terminal if run._terminal is not None else await run._poll()
                fresh = await self._services.store.events(run.execution_id, seen)
                seen += len(fresh)
                for event in fresh:
                    if isinstance(event, ev.UpdateCompleted) and event.update_id == update_id:
                        if not event.ok:
                            raise UpdateFailedError(
                                f"update {name!r} failed: {event.error}",
                                execution_id=run.execution_id,
                                step_id=self._step_id,
                            )
                        return event.result
                if isinstance(ended, ev.StepContinued):
                    # the run continued as new before it ran the update: it handed the
                    # update over with its inbox, and the successor runs it
                    run, seen = ExecutionHandle(self._services, ended.successor), 1
                    continue
                if ended is not None:
                    raise UpdateFailedError(
                        f"the execution ended before update {name!r} ran",
                        execution_id=run.execution_id,
                        step_id=self._step_id,
                    )
                await self._services.changes.wait(delay)
                delay = min(delay * 2, _MAX_POLL)
        raise ResultTimeout(
            f"update {name!r} did not complete within {timeout} seconds",
            execution_id=self.execution_id,
            step_id=self._step_id,
            hint="It is still queued; updates run when the handler reaches a wait point",
        )

    async def query(self, name: str, *args: Any) -> Any:
        """Ask the handler's ``ctx.on_query(name, fn)``; reads the log, records nothing."""
        latest = await latest_run(self._services.store, self.execution_id)  # the chain's last
        return await run_query(self._services.runtime(), latest, name, args)

    async def describe(self) -> StepRecord:
        """The execution record (its fields and every attempt)."""
        _, events = await self._services.store.load(self.execution_id)
        return record_of(events)
