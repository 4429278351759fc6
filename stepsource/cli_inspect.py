"""The read-only ``stepsource`` commands: ``ls``, ``show``, ``history``, ``events``, ``tail``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stepsource.aggregates import events as ev
from stepsource.engine.engine import Engine
from stepsource.engine.handover import STOPPED
from stepsource.errors import UsageError
from stepsource.projections.executions_index import summary_json
from stepsource.projections.models import HistoryEntry

from .cli_output import (
    EXIT_OK,
    STATUS_STYLES,
    dumps,
    resolve_id,
    short,
    short_id,
)

__all__ = ["history", "ls", "print_history", "show", "tail", "takeovers"]

#: the console width from which ``ls`` shows whole execution ids
FULL_IDS_WIDTH = 130
#: how often ``tail`` looks for new events
TAIL_POLL = 0.2


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%m-%d %H:%M:%S")


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


async def ls(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    rows = await engine.executions(
        status=args.status,
        step_id=args.step,
        flow_id=args.flow,
        since=args.since,
        limit=args.limit,
        offset=args.offset,
        cursor=args.cursor,
        key=args.key,
    )
    if args.json:
        print(dumps([summary_json(r) for r in rows]))
        return EXIT_OK
    # whole ids where they fit; in a narrow console the first characters (every command
    # taking an id accepts a unique prefix), no borders and no event count
    full = console.width >= FULL_IDS_WIDTH
    table = (
        Table(title="executions (newest first)", box=box.HEAVY_HEAD)
        if full
        else Table(title="executions (newest first)", box=None, pad_edge=False)
    )
    keyed = any(r.key is not None for r in rows)  # a column for business keys where any
    columns = [
        "id",
        *(["key"] if keyed else []),
        "step",
        "status",
        "try",
        *(["events"] if full else []),
        "created",
    ]
    for name in columns:
        table.add_column(name, no_wrap=name != "step", overflow="fold")
    used = sum((8, 18, 9, 3, 14)) + 2 * len(columns)  # narrow: what the other columns take
    room = 60 if full else max(console.width - used, 8)
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=room)
    for r in rows:
        error = "" if r.last_error is None else str(r.last_error.get("message", ""))
        cells: list[str | Text] = [
            r.execution_id if full else short_id(r.execution_id),
            *([Text(r.key or "")] if keyed else []),  # user text: never read as markup
            Text(f"{r.step_id}@{r.step_version}"),
            status_text(r.status),
            str(r.attempt),
            *([str(r.version)] if full else []),
            _when(r.created_at),
            Text(error if len(error) <= room else error[: room - 1] + "…"),
        ]
        table.add_row(*cells)
    console.print(table)
    if rows and len(rows) == args.limit:
        console.print(f"next page: stepsource ls --cursor {rows[-1].execution_id}", highlight=False)
    return EXIT_OK


async def show(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    execution_id = await resolve_id(engine, args.id)
    if args.at is not None:
        last = (await engine.describe(execution_id)).version
        if not 1 <= args.at <= last:
            raise UsageError(
                f"--at {args.at} is outside the execution's events (versions 1 to {last})",
                execution_id=execution_id,
                hint=f"Pick a version from 1 to {last}; `stepsource events ID` lists them",
            )
    record = await engine.describe(execution_id, at_version=args.at)
    state = await engine.state_of(execution_id, at_version=args.at)
    if args.json:
        print(dumps({"record": record, "state": state}))
        return EXIT_OK
    at = f" (at version {args.at})" if args.at is not None else ""
    title = Text.assemble(
        (record.id, "bold"),
        f" {record.step_id}@{record.step_version}: ",
        status_text(record.status),
    )
    console.print(title + at, highlight=False)
    console.print(
        f"version {record.version}, attempts {len(record.executions)}, "
        f"retries {record.retry_count}/{record.max_retries}, worker {record.worker_id or 'none'}",
        highlight=False,
    )
    for label, link in (
        ("continued from", record.continued_from),
        ("continued as", record.continued_as),
    ):
        if link is not None:  # ctx.continue_as_new: the runs before and after this one
            console.print(f"{label} {link}", highlight=False)
    for label, value in (
        ("input", record.input),
        ("output", record.output),
        ("state", state),
        ("error", record.error),
    ):
        if value is not None:
            console.print(f"{label:<6} {short(value, 200)}", highlight=False, markup=False)
    return EXIT_OK


ENDS_ATTEMPT = (ev.AttemptFailed, ev.StepCompleted, ev.StepFailed, ev.StepCancelled)


def takeovers(events: Sequence[ev.ExecutionEvent]) -> list[HistoryEntry]:
    """A history entry of type ``takeover`` for every lease taken on an attempt another
    worker left running: it died or lost its lease, or it stopped and handed the attempt
    over (``handed_over``: a graceful stop, engine/handover.py); the history projection
    leaves leases out."""
    found: list[HistoryEntry] = []
    open_attempt: int | None = None
    suspended = handed_over = False
    holder: str | None = None
    for event in events:
        if isinstance(event, ev.StepStarted):
            open_attempt = event.attempt
        elif isinstance(event, ev.StepSuspended):
            handed_over = event.reason == STOPPED
            suspended = not handed_over
        elif isinstance(event, ev.StepParked):
            suspended = True  # set aside: a later lease is a release, not a takeover
        elif isinstance(event, ENDS_ATTEMPT):
            open_attempt = None
        elif isinstance(event, ev.BackendOutage) and found:
            found[-1].details["outage"] = True  # the takeover just listed followed an outage
        elif isinstance(event, ev.StepLeased):
            if event.attempt == open_attempt and not suspended:
                found.append(
                    HistoryEntry(
                        timestamp=event.timestamp,
                        type="takeover",
                        details={
                            "attempt": event.attempt,
                            "worker_id": event.worker_id,
                            "previous_worker_id": holder,
                            **({"handed_over": True} if handed_over else {}),
                        },
                        version=event.originator_version,
                    )
                )
            suspended = handed_over = False
            holder = event.worker_id
    return found


async def _history_with_takeovers(engine: Engine, execution_id: str) -> list[HistoryEntry]:
    entries = await engine.history_of(execution_id)
    extra = takeovers(await engine.events(execution_id))
    return sorted([*entries, *extra], key=lambda e: e.version)


async def print_history(engine: Engine, execution_id: str, console: Console) -> None:
    table = Table(title="history")
    for column in ("version", "timestamp", "type", "details"):
        table.add_column(column)
    for entry in await _history_with_takeovers(engine, execution_id):
        table.add_row(
            str(entry.version),
            entry.timestamp.strftime("%H:%M:%S.%f")[:-3],
            Text(entry.type, style="yellow" if entry.type == "takeover" else ""),
            Text(short(entry.details)),
        )
    console.print(table)


async def history(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    execution_id = await resolve_id(engine, args.id)
    if args.json:
        print(dumps(await _history_with_takeovers(engine, execution_id)))
        return EXIT_OK
    await print_history(engine, execution_id, console)
    return EXIT_OK


def event_data(event: ev.ExecutionEvent) -> dict[str, Any]:
    skip = ("originator_id", "originator_version", "timestamp")
    return {k: v for k, v in vars(event).items() if k not in skip}


async def events(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    execution_id = await resolve_id(engine, args.id)
    found = await engine.events(execution_id, args.first or None, args.last or None)
    if args.json:
        print(
            dumps(
                [
                    {
                        "version": e.originator_version,
                        "type": type(e).__name__,
                        **{k: v for k, v in vars(e).items() if k != "originator_id"},
                    }
                    for e in found
                ]
            )
        )
        return EXIT_OK
    table = Table(title=f"events of {execution_id}")
    for column in ("version", "timestamp", "event", "data"):
        table.add_column(column)
    for e in found:
        table.add_row(
            str(e.originator_version),
            e.timestamp.isoformat(),
            type(e).__name__,
            Text(short(event_data(e))),
        )
    console.print(table)
    return EXIT_OK


async def tail(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, not {args.limit}")
    store = engine.store
    position = await store.backend.max_position()
    print(f"following the log from position {position}", file=sys.stderr, flush=True)
    steps: dict[str, str] = {}
    printed = 0
    while args.limit is None or printed < args.limit:
        records = await store.backend.read_all(position, 100)
        if not records:
            await anyio.sleep(TAIL_POLL)
            continue
        for record, event in zip(records, store.decode_all(records), strict=True):
            position = record.position
            step = steps.get(record.stream_id)
            if step is None:
                step = steps[record.stream_id] = await _step_of(engine, record.stream_id, event)
            if args.json:
                line = {
                    "position": record.position,
                    "execution_id": record.stream_id,
                    "version": record.version,
                    "type": type(event).__name__,
                    "timestamp": event.timestamp.isoformat(),
                    "step_id": step,
                    "data": event_data(event),
                }
                print(dumps(line), flush=True)
            else:
                console.print(
                    f"{record.position:>7} {event.timestamp.strftime('%H:%M:%S.%f')[:-3]} "
                    f"{record.stream_id} v{record.version:<4} "
                    f"{type(event).__name__:<18} {step} {short(event_data(event), 60)}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
            printed += 1
            if args.limit is not None and printed >= args.limit:
                break
    return EXIT_OK


async def _step_of(engine: Engine, execution_id: str, event: ev.ExecutionEvent) -> str:
    if isinstance(event, ev.StepScheduled):
        return event.step_id
    first = await engine.events(execution_id, 1, 1)
    return first[0].step_id if first and isinstance(first[0], ev.StepScheduled) else "?"
