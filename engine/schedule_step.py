"""The built-in step that runs a schedule: one run per slot (or command), chained by
continue-as-new.

A schedule is an execution of :data:`SCHEDULE_STEP` started with the schedule's name as its
business key. Each run handles what comes next and continues as new, so no run's log grows:

1. it waits, suspended and holding no worker, until its next slot or a command (a signal);
2. for a slot: slots older than the ``catch_up`` window are recorded as missed and passed
   over; otherwise it checks the overlap policy against the execution the last slot started,
   then starts the slot's execution inside ``ctx.do`` with the slot key as business key
   (:func:`~stepsource.engine.cron.slot_key`): its id is derived from the schedule's name and
   the slot's time, so however many workers run the schedule, and however often a run is
   resumed after a crash, the log's version check lets exactly one execution start per slot;
3. every command received is applied in order (pause, resume, trigger, delete) and its id is
   carried to the next run (``acked``), so a command re-sent by a client is applied once;
4. it records a history entry for each slot (``fired`` with the execution it started,
   ``skipped``, ``missed``, ``start-failed``) and command, and continues as new with the slot
   handled (``after``) and the execution started (``last``).
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from typing import TYPE_CHECKING, Any

from stepsource.engine.clock import to_ms
from stepsource.engine.context import StepContext
from stepsource.engine.continuation import latest_run
from stepsource.engine.cron import ScheduleSpec, slot_key, slot_text
from stepsource.engine.ids import execution_id_for_key
from stepsource.engine.recorder import ENDED
from stepsource.errors import StepsourceError, VersionConflictError, WaitTimeout

if TYPE_CHECKING:
    from stepsource.engine.runtime import Runtime

__all__ = ["COMMAND_SIGNAL", "SCHEDULE_STEP", "run_schedule"]

#: the id of the built-in step every schedule is an execution of
SCHEDULE_STEP = "stepsource.schedule"
#: the signal a client sends a schedule's run: {"op": ..., "id": ...}
COMMAND_SIGNAL = "schedule-command"
#: how many command ids a run carries to the next (a resent command is applied once)
ACKED_KEPT = 64
#: how often a buffered slot looks whether the previous execution ended (seconds)
BUFFER_POLL = 1.0


def spec_of(state: dict[str, Any]) -> ScheduleSpec:
    """The spec a run's input carries (validated when the schedule was created)."""
    every_ms = state.get("every_ms")
    return ScheduleSpec.build(
        state["name"],
        cron=state.get("cron"),
        every=None if every_ms is None else every_ms / 1000,
        timezone=state.get("timezone", "UTC"),
        overlap=state.get("overlap", "skip"),
        catch_up=state.get("catch_up_ms", 60_000) / 1000,
    )


async def _running(runtime: Runtime, execution_id: str | None) -> bool:
    """Whether the execution (the last run of its chain) has not ended."""
    if execution_id is None:
        return False
    store = runtime.store
    latest = await latest_run(store, execution_id)
    last = await store.backend.stream_version(latest)
    if last == 0:
        return False
    (event,) = await store.events(latest, last, last)
    return not isinstance(event, ENDED)


async def _start(runtime: Runtime, step: str, input: dict[str, Any], key: str) -> dict[str, Any]:
    """Start the slot's execution (idempotent on its key); what the history shows of it."""
    execution_id = execution_id_for_key(step, key)
    assert runtime.start_child is not None
    try:
        await runtime.start_child(
            None, step_id=step, input=input, execution_id=uuid.UUID(execution_id), key=key
        )
    except VersionConflictError:
        pass  # started already: by an earlier try of this run, resumed after a crash
    except StepsourceError as error:  # unknown step, bad input: the schedule goes on
        return {"key": key, "error": str(error)}
    return {"key": key, "execution_id": execution_id}


async def run_schedule(
    ctx: StepContext,
    name: str,
    step: str,
    after: int,
    input: dict[str, Any] | None = None,
    cron: str | None = None,
    every_ms: int | None = None,
    timezone: str = "UTC",
    overlap: str = "skip",
    catch_up_ms: int = 60_000,
    paused: bool = False,
    last: str | None = None,
    acked: list[str] | None = None,
) -> dict[str, Any]:
    """One run of the schedule ``name`` (see the module docstring)."""
    state: dict[str, Any] = {
        "name": name,
        "step": step,
        "after": after,
        "input": input or {},
        "cron": cron,
        "every_ms": every_ms,
        "timezone": timezone,
        "overlap": overlap,
        "catch_up_ms": catch_up_ms,
        "paused": paused,
        "last": last,
    }
    spec = spec_of(state)
    runtime = ctx.recorder.runtime
    done: list[str] = list(acked or [])
    commands: list[dict[str, Any]] = []

    def command(payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        cid = payload.get("id")  # a command sent again is applied once
        if cid not in done and all(cid != seen.get("id") for seen in commands):
            commands.append(payload)

    ctx.on_signal(COMMAND_SIGNAL, command)
    now = to_ms(await ctx.now())
    slot = spec.next_slot(after)
    timeout = None if paused else max(0.0, (slot - now) / 1000)
    with contextlib.suppress(WaitTimeout):
        await ctx.wait_for_condition(lambda: bool(commands), timeout=timeout)
    if not commands:
        state["after"], started = await _slot(ctx, spec, state, slot, commands)
        if started is not None:
            state["last"] = started
    deleted = False
    for payload in commands:
        op, cid = payload.get("op"), str(payload.get("id"))
        done = [*done, cid][-ACKED_KEPT:]
        if op == "pause":
            state["paused"] = True
            ctx.add_history_entry("paused", {"command": cid})
        elif op == "resume" and state.get("paused"):
            # slots that passed while paused are not caught up: the next is after now
            state["paused"], state["after"] = False, to_ms(await ctx.now())
            ctx.add_history_entry("resumed", {"command": cid})
        elif op == "trigger":
            key = f"schedule:{name}@trigger:{cid}"
            started_by = await ctx.do(
                f"trigger-{cid}", functools.partial(_start, runtime, step, state["input"], key)
            )
            ctx.add_history_entry("triggered", {"command": cid, **started_by})
            state["last"] = started_by.get("execution_id", state.get("last"))
        elif op == "delete":
            ctx.add_history_entry("deleted", {"command": cid})
            deleted = True
    state["acked"] = done
    if not deleted:
        await ctx.continue_as_new(state)
    return {"deleted": True, "name": name}


async def _slot(
    ctx: StepContext,
    spec: ScheduleSpec,
    state: dict[str, Any],
    slot: int,
    commands: list[dict[str, Any]],
) -> tuple[int, str | None]:
    """Handle the slot ``slot``; the slot handled last and the execution started, if any.
    A buffered slot waits for the previous execution's end or a command (``commands``, filled
    by the run's signal handler): a pause or a delete drops it, and any other command is
    applied first, the slot buffered again by the next run."""
    runtime = ctx.recorder.runtime
    now = to_ms(await ctx.now())
    if now - slot > spec.catch_up_ms:  # too late: pass over every slot outside the window
        last_missed = max(slot, spec.slot_before(now - spec.catch_up_ms))
        ctx.add_history_entry("missed", {"from": slot_text(slot), "to": slot_text(last_missed)})
        return last_missed, None
    last = state.get("last")
    if spec.overlap != "allow" and await ctx.do(f"running-{slot}", lambda: _running(runtime, last)):
        if spec.overlap == "skip":
            ctx.add_history_entry("skipped", {"slot": slot_text(slot), "running": last})
            return slot, None
        tries = 0
        while await ctx.do(f"running-{slot}-{tries}", lambda: _running(runtime, last)):
            tries += 1
            with contextlib.suppress(WaitTimeout):
                await ctx.wait_for_condition(lambda: bool(commands), timeout=BUFFER_POLL)
            if any(c.get("op") in ("pause", "delete") for c in commands):
                ops = sorted({str(c.get("op")) for c in commands} & {"pause", "delete"})
                ctx.add_history_entry(
                    "skipped", {"slot": slot_text(slot), "running": last, "dropped_by": ops}
                )
                return slot, None
            if commands:  # a trigger or resume goes first; the next run buffers it again
                return state["after"], None
    started = await ctx.do(
        f"start-{slot}",
        lambda: _start(runtime, state["step"], state["input"], slot_key(state["name"], slot)),
    )
    if "error" in started:
        ctx.add_history_entry("start-failed", {"slot": slot_text(slot), **started})
        return slot, None
    ctx.add_history_entry("fired", {"slot": slot_text(slot), **started})
    handled = slot
    if spec.overlap == "buffer_one":  # the slots that passed while it waited are dropped
        handled = max(slot, spec.slot_before(to_ms(await ctx.now()) + 1))
        if handled > slot:
            ctx.add_history_entry(
                "dropped",
                {"from": slot_text(spec.next_slot(slot)), "to": slot_text(handled)},
            )
    return handled, started["execution_id"]
