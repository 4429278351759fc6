"""`stepsource schedules`: list, show, pause, resume, trigger and delete schedules.

Schedules are created in code (``engine.schedule(...)``, see docs/schedules.md); from the
command line they are inspected and commanded. A command returns once a run of the schedule
received it (a worker whose engine runs schedules must be running).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stepsource.engine.engine import Engine
from stepsource.engine.schedules import COMMAND_TIMEOUT, ScheduleInfo

from .cli_output import EXIT_OK, dumps, positive, seconds

__all__ = ["add_parser", "schedules"]

ACTIONS = ("pause", "resume", "trigger", "delete")


def add_parser(
    command: Callable[[str, str], argparse.ArgumentParser],
    json_flag: Callable[[argparse.ArgumentParser], None],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``schedules ACTION ...`` to the parser (``command`` makes a subcommand)."""
    parser = command("schedules", "list, show, pause, resume, trigger or delete schedules")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="every schedule not deleted")
    json_flag(listing)
    show = actions.add_parser(
        "show", parents=[common], help="a schedule and its history: each slot, its execution"
    )
    show.add_argument("name")
    show.add_argument("--limit", type=positive, default=20, help="history entries (default 20)")
    json_flag(show)
    helps = {
        "pause": "fire no slot until resumed",
        "resume": "fire again from the next slot",
        "trigger": "start the step now, outside the slots",
        "delete": "end the schedule for good (its history stays)",
    }
    for action in ACTIONS:
        one = actions.add_parser(action, parents=[common], help=helps[action])
        one.add_argument("name")
        one.add_argument(
            "--timeout",
            type=seconds,
            default=COMMAND_TIMEOUT,
            help=f"how long a worker has to take the command (default {COMMAND_TIMEOUT:g} s)",
        )
        json_flag(one)


def _info_json(info: ScheduleInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["next_slot"] = None if info.next_slot is None else info.next_slot.isoformat()
    return data


def _when(info: ScheduleInfo) -> str:
    if info.cron is not None:
        return f"cron {info.cron} ({info.timezone})"
    return f"every {info.every:g} s"


async def schedules(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.action == "list":
        found = await engine.schedules()
        if args.json:
            print(dumps([_info_json(info) for info in found]))
            return EXIT_OK
        table = Table(title="schedules", box=box.HEAVY_HEAD)
        for column in ("name", "step", "when", "overlap", "state", "next slot", "last execution"):
            table.add_column(column, overflow="fold")
        for info in found:
            table.add_row(  # names, steps and cron text are the user's: never markup
                Text(info.name),
                Text(info.step_id),
                Text(_when(info)),
                info.overlap,
                "stopped" if info.failure else "paused" if info.paused else "active",
                "" if info.next_slot is None else info.next_slot.isoformat(),
                info.last_execution_id or "",
            )
        console.print(table)
        return EXIT_OK
    schedule = engine.get_schedule(args.name)
    if args.action == "show":
        info = await schedule.describe()
        history = await schedule.history(limit=args.limit)
        if args.json:
            entries = [
                {**dataclasses.asdict(e), "timestamp": e.timestamp.isoformat()} for e in history
            ]
            print(dumps({"schedule": _info_json(info), "history": entries}))
            return EXIT_OK
        state = (
            "deleted"
            if info.deleted
            else f"stopped: {info.failure}"
            if info.failure
            else "paused"
            if info.paused
            else "active"
        )
        console.print(
            f"{info.name}: {info.step_id} {_when(info)}, overlap {info.overlap}, "
            f"catch-up {info.catch_up:g} s, {state}",
            highlight=False,
            markup=False,
        )
        if info.next_slot is not None:
            console.print(f"next slot {info.next_slot.isoformat()}", highlight=False)
        table = Table(title="history (oldest first)", box=box.HEAVY_HEAD)
        for column in ("time", "what", "slot", "execution"):
            table.add_column(column, overflow="fold")
        for entry in history:
            last = entry.details.get("to")  # a range of slots: missed, dropped
            table.add_row(
                entry.timestamp.isoformat(timespec="seconds"),
                entry.type,
                f"{entry.slot} to {last}" if last else entry.slot or "",
                Text(entry.execution_id or str(entry.details.get("error", ""))),
            )
        console.print(table)
        return EXIT_OK
    started = None
    if args.action == "trigger":
        started = (await schedule.trigger(timeout=args.timeout)).execution_id
    else:
        await getattr(schedule, args.action)(timeout=args.timeout)
    if args.json:
        print(dumps({"schedule": args.name, "action": args.action, "execution_id": started}))
    else:
        done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}
        what = f"started {started}" if started else done[args.action]
        console.print(f"schedule {args.name}: {what}", highlight=False, markup=False)
    return EXIT_OK
