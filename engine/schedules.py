"""Schedules from the client side: create, describe, pause, resume, trigger, delete, history.

A schedule is a chain of runs of the built-in step (:mod:`.schedule_step`) whose business
key is the schedule's name; its current run is the chain's last. Commands are signals to
that run, each with an id; a signal reaches the chain once (a run continuing as new hands
what it did not take to its successor), and the runs carry the ids they applied and ignore a
command seen twice, so every command is applied exactly once. A command returns once a run
received it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject, to_json_object
from stepsource.engine.clock import Clock
from stepsource.engine.continuation import latest_run
from stepsource.engine.cron import ScheduleSpec
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.handle import ExecutionHandle
from stepsource.engine.published import fetch_published
from stepsource.engine.recorder import ENDED
from stepsource.engine.schedule_step import COMMAND_SIGNAL, SCHEDULE_STEP, run_schedule
from stepsource.engine.store import ExecutionStore
from stepsource.errors import (
    BackendUnavailableError,
    ResultTimeout,
    StepsourceError,
    UnknownExecutionError,
    UsageError,
)
from stepsource.projections.models import HistoryEntry
from stepsource.projections.summaries import ExecutionSummary

__all__ = [
    "SCHEDULE_ENTRY_TYPES",
    "ScheduleEntry",
    "ScheduleHandle",
    "ScheduleHost",
    "ScheduleInfo",
    "create_schedule",
    "list_schedules",
    "register_schedule_step",
]

#: the history entries of a schedule's runs that make its history
SCHEDULE_ENTRY_TYPES = frozenset(
    {
        "fired",
        "skipped",
        "dropped",
        "missed",
        "start-failed",
        "paused",
        "resumed",
        "triggered",
        "deleted",
    }
)
#: how long a command waits for the schedule to receive it, by default (seconds)
COMMAND_TIMEOUT = 30.0
#: the runs of a schedule still going (its current run is one of them)
_LIVE = ("waiting", "scheduled", "executing", "retrying", "throttled", "parked")


class ScheduleHost(Protocol):
    """What schedules use of an Engine."""

    clock: Clock

    @property
    def store(self) -> ExecutionStore: ...

    def step_ids(self) -> list[str]: ...

    async def executions(
        self,
        status: str | None = None,
        step_id: str | None = None,
        flow_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        key: str | None = None,
    ) -> list[ExecutionSummary]: ...

    async def history_of(
        self, execution_id: str, at_version: int | None = None
    ) -> list[HistoryEntry]: ...

    def get_handle(self, execution_id: str) -> ExecutionHandle[Any]: ...


#: ``engine.start`` as schedules call it: (step id, input, key=, if_exists=)
Starting = Callable[..., Awaitable[ExecutionHandle[Any]]]


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as its current run sees it."""

    name: str
    step_id: str
    cron: str | None
    every: float | None
    timezone: str
    overlap: str
    catch_up: float
    input: JSONObject
    paused: bool
    deleted: bool
    #: the next slot (None while paused or once deleted)
    next_slot: datetime | None
    #: the execution the last slot (or trigger) started
    last_execution_id: str | None
    #: the schedule's current run (an execution of the built-in step ``stepsource.schedule``)
    run_id: str
    #: why the schedule stopped without being deleted (its run failed or was cancelled)
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    """One line of a schedule's history: a slot (``fired``, ``skipped``, ``start-failed``),
    a range of slots (``missed``, ``dropped``: ``slot`` is the first, ``details["to"]`` the
    last) or a command (``paused``, ``resumed``, ``triggered``, ``deleted``)."""

    timestamp: datetime
    type: str
    slot: str | None
    execution_id: str | None
    details: JSONObject


def register_schedule_step(register: Callable[..., Callable[[Any], Any]]) -> None:
    """Register the built-in step with ``register`` (an engine's ``step`` decorator)."""
    register(SCHEDULE_STEP, description="runs a schedule (engine.schedule)", max_retries=5)(
        run_schedule
    )


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise UsageError(
            f"a schedule name is printable text of 1 to 200 characters, not {name!r}",
            hint='For example "nightly-report"',
        )
    return name


async def create_schedule(
    host: ScheduleHost,
    start: Starting,
    name: str,
    step: str,
    spec: ScheduleSpec,
    input: Mapping[str, Any] | None,
    definition: StepDefinition | None,
) -> ScheduleHandle:
    """Create the schedule ``name``, or attach to it if it exists with the same definition."""
    try:
        data = to_json_object(dict(input or {}), what="the schedule's input", step_id=step)
        # a step no worker runs, or a bad input, is refused now rather than at every slot
        if definition is not None:
            definition.input_kwargs(data)
        else:
            published = await fetch_published(host.store.backend, step, host.step_ids())
            published.validate_input(data, execution_id=None)
    except StepsourceError as error:
        if isinstance(error, BackendUnavailableError):
            raise
        raise error.about(f"schedule {name!r}") from None
    wanted: dict[str, Any] = {
        "name": _check_name(name),
        "step": step,
        "input": data,
        "cron": spec.cron,
        "every_ms": spec.every_ms,
        "timezone": spec.timezone,
        "overlap": spec.overlap,
        "catch_up_ms": spec.catch_up_ms,
    }
    first = await start(
        SCHEDULE_STEP, {**wanted, "after": host.clock.now_ms()}, key=name, if_exists="attach"
    )
    events = await host.store.events(first.execution_id, 1, 1)
    assert isinstance(events[0], ev.StepScheduled)
    existing = {k: events[0].input.get(k) for k in wanted}
    if existing != wanted:
        raise UsageError(
            f"a schedule named {name!r} exists with another definition",
            hint="Delete it first (engine.get_schedule(name).delete()) and pick a new name, "
            "or declare it as it is",
        )
    handle = ScheduleHandle(host, name)
    if (await handle.describe()).deleted:
        raise UsageError(
            f"the schedule {name!r} was deleted; a schedule's name is never reused",
            hint="Pick another name",
        )
    return handle


async def list_schedules(host: ScheduleHost) -> list[ScheduleInfo]:
    """Every schedule not deleted, by name."""
    # the current run of a schedule that waits long is found by its status; one that moves
    # every second may change status between those queries, but its runs are the newest
    names: set[str] = set()
    for status in (None, *_LIVE):
        limit = 1000 if status is None else 10_000
        rows = await host.executions(step_id=SCHEDULE_STEP, status=status, limit=limit)
        names.update(row.key for row in rows if row.key is not None)
    found = [await ScheduleHandle(host, name).describe() for name in sorted(names)]
    return [info for info in found if not info.deleted]


class ScheduleHandle:
    """A schedule by name (no I/O until a call)."""

    def __init__(self, host: ScheduleHost, name: str) -> None:
        self._host = host
        self.name = _check_name(name)

    def __repr__(self) -> str:
        return f"ScheduleHandle({self.name!r})"

    async def current_run(self) -> str:
        """The id of the schedule's current run (the last of its chain)."""
        rows = await self._host.executions(step_id=SCHEDULE_STEP, key=self.name, limit=1)
        if not rows:
            raise UnknownExecutionError(
                f"no schedule named {self.name!r}",
                hint="`stepsource schedules list` shows the schedules",
            )
        return await latest_run(self._host.store, rows[0].execution_id)

    async def _run_state(self) -> tuple[str, dict[str, Any], ev.ExecutionEvent]:
        run = await self.current_run()
        store = self._host.store
        last = await store.backend.stream_version(run)
        first = (await store.events(run, 1, 1))[0]
        assert isinstance(first, ev.StepScheduled)
        (end,) = await store.events(run, last, last)
        return run, dict(first.input), end

    async def describe(self) -> ScheduleInfo:
        """The schedule's definition and where it stands."""
        run, state, end = await self._run_state()
        deleted = isinstance(end, ev.StepCompleted) and not isinstance(end, ev.StepContinued)
        failure = _failure(end)
        spec = ScheduleSpec.build(
            self.name,
            cron=state.get("cron"),
            every=None if state.get("every_ms") is None else state["every_ms"] / 1000,
            timezone=state["timezone"],
            overlap=state["overlap"],
            catch_up=state["catch_up_ms"] / 1000,
        )
        paused = bool(state.get("paused"))
        upcoming = None
        if not (paused or deleted or failure):
            upcoming = datetime.fromtimestamp(spec.next_slot(state["after"]) / 1000, tz=UTC)
        return ScheduleInfo(
            name=self.name,
            step_id=state["step"],
            cron=spec.cron,
            every=None if spec.every_ms is None else spec.every_ms / 1000,
            timezone=spec.timezone,
            overlap=spec.overlap,
            catch_up=spec.catch_up_ms / 1000,
            input=state.get("input") or {},
            paused=paused,
            deleted=deleted,
            failure=failure,
            next_slot=upcoming,
            last_execution_id=state.get("last"),
            run_id=run,
        )

    async def history(self, limit: int = 100) -> list[ScheduleEntry]:
        """The last ``limit`` entries of the schedule's history, oldest first: every slot
        (and the execution it started) and every command."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError(f"limit must be an int >= 1, not {limit!r}")
        run: str | None = await self.current_run()
        entries: list[ScheduleEntry] = []
        store = self._host.store
        while run is not None and len(entries) < limit:
            found = [
                ScheduleEntry(
                    timestamp=entry.timestamp,
                    type=entry.type,
                    slot=_text(entry.details.get("slot") or entry.details.get("from")),
                    execution_id=_text(entry.details.get("execution_id")),
                    details=dict(entry.details),
                )
                for entry in await self._host.history_of(run)
                if entry.type in SCHEDULE_ENTRY_TYPES
            ]
            entries[:0] = found
            first = (await store.events(run, 1, 1))[0]
            assert isinstance(first, ev.StepScheduled)
            run = first.continued_from
        return entries[-limit:]

    async def pause(self, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """No slot fires until :meth:`resume` (slots passed meanwhile are not caught up)."""
        await self._command("pause", timeout)

    async def resume(self, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """Fire again from the next slot after now."""
        await self._command("resume", timeout)

    async def trigger(self, *, timeout: float = COMMAND_TIMEOUT) -> ExecutionHandle[Any]:
        """Start the step now, outside the slots (the overlap policy does not apply); the
        handle of the execution started."""
        run, cid = await self._command("trigger", timeout)
        store = self._host.store
        with anyio.move_on_after(timeout):  # the run records it as it ends
            while True:
                last = await store.backend.stream_version(run)
                if isinstance((await store.events(run, last, last))[0], ENDED):
                    break
                await anyio.sleep(0.05)
        for entry in await self._host.history_of(run):
            if entry.type == "triggered" and entry.details.get("command") == cid:
                execution_id = entry.details.get("execution_id")
                if isinstance(execution_id, str):
                    return self._host.get_handle(execution_id)
                raise UsageError(
                    f"the schedule {self.name!r} could not start its step: "
                    f"{entry.details.get('error')}",
                    hint="Check that a worker registers the step and the schedule's input",
                )
        raise ResultTimeout(
            f"the schedule {self.name!r} received the trigger but did not start the step "
            f"within {timeout} s",
            hint="It starts it when its worker runs again; see engine.get_schedule(name).history()",
        )

    async def delete(self, *, timeout: float = COMMAND_TIMEOUT) -> None:
        """End the schedule for good (its history stays; its name is not reused)."""
        await self._command("delete", timeout)

    async def _command(self, op: str, timeout: float) -> tuple[str, str]:
        """Send ``op`` to the schedule's current run; once a run of the chain received it,
        that run and the command id. The handle delivers the signal once to the chain (a
        run continuing as new hands it on), so the run that received it is that run or one
        after it."""
        cid = uuid.uuid4().hex
        store = self._host.store
        run, _state, end = await self._run_state()
        failure = _failure(end)
        if failure is not None:
            raise UsageError(
                f"the schedule {self.name!r} stopped: its run {run} {failure}",
                hint="Its history shows what it did; delete it and create it anew",
            )
        if isinstance(end, ENDED) and not isinstance(end, ev.StepContinued):
            raise UsageError(f"the schedule {self.name!r} was deleted", hint="Pick another name")
        await self._host.get_handle(run).signal(COMMAND_SIGNAL, {"op": op, "id": cid})
        with anyio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                events = await store.events(run)
                if any(_carries(event, cid) for event in events):
                    return run, cid
                if isinstance(events[-1], ev.StepContinued):
                    run = events[-1].successor  # it went on without it: a later run has it
                    continue
                if isinstance(events[-1], ENDED):
                    raise UsageError(
                        f"the schedule {self.name!r} ended before it received the {op} command",
                        hint="`stepsource schedules show NAME` shows its history",
                    )
                await anyio.sleep(0.05)
        raise ResultTimeout(
            f"the schedule {self.name!r} did not receive the {op} command within {timeout} s",
            hint="Commands are taken by a running worker whose engine runs schedules "
            "(engine.enable_schedules()); it is applied when one does",
        )


def _failure(end: ev.ExecutionEvent) -> str | None:
    """What stopped a schedule whose current run failed or was cancelled, else None."""
    if isinstance(end, ev.StepFailed):
        return f"failed ({end.error_type}): {end.reason}"
    if isinstance(end, ev.StepCancelled):
        return f"was cancelled: {end.reason}"
    return None


def _carries(event: ev.ExecutionEvent, cid: str) -> bool:
    return (
        isinstance(event, ev.SignalReceived)
        and event.name == COMMAND_SIGNAL
        and isinstance(event.payload, dict)
        and event.payload.get("id") == cid
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
