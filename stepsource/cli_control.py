"""The ``stepsource`` commands that change things: ``start``, ``signal``, ``send-event``,
``cancel``, ``export`` and ``projections rebuild``."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.urls import open_backend
from stepsource.engine.continuation import latest_run
from stepsource.engine.engine import Engine
from stepsource.engine.export import export_log
from stepsource.errors import ResultTimeout, StepCancelledError, StepFailedError, UsageError

from .cli_output import (
    EXIT_OK,
    EXIT_PROBLEM,
    dumps,
    json_arg,
    print_error,
    progress_bar,
    resolve_id,
)

__all__ = ["cancel", "export", "message", "rebuild", "start"]

#: the statuses of an execution that has ended
ENDED = ("completed", "failed", "cancelled")


async def start(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    payload = json_arg(args.input, "the input")
    if not isinstance(payload, dict):
        raise UsageError(
            f"the input must be a JSON object, not {type(payload).__name__}",
            step_id=args.step,
            hint="""For example: stepsource start my.step '{"n": 1}'""",
        )
    handle = await engine.start(args.step, payload, execution_id=args.id, key=args.key)
    if not args.wait:
        print(dumps({"execution_id": handle.execution_id}) if args.json else handle.execution_id)
        return EXIT_OK
    try:
        output = await handle.result(timeout=args.timeout)
    except (StepFailedError, StepCancelledError, ResultTimeout) as error:
        if args.json:
            print(dumps({"execution_id": handle.execution_id, "error": str(error)}))
        print_error(error)
        return EXIT_PROBLEM
    if args.json:
        print(dumps({"execution_id": handle.execution_id, "output": output}))
    else:
        console.print(f"execution {handle.execution_id} completed", highlight=False)
        print(dumps(output))
    return EXIT_OK


async def message(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    payload = json_arg(args.payload, "the payload")
    handle = engine.get_handle(await resolve_id(engine, args.id))
    if args.command == "signal":
        await handle.signal(args.name, payload)
        what = "signal"
    else:
        await handle.send_event(args.name, payload)
        what = "event"
    console.print(
        f"sent {what} {args.name!r} to {await _run_named(engine, handle.execution_id)}",
        highlight=False,
        markup=False,
    )
    return EXIT_OK


async def _run_named(engine: Engine, execution_id: str) -> str:
    """The id of the run a message to ``execution_id`` reaches: itself, or the latest run of
    the chain it continued as new into, said so."""
    latest = await latest_run(engine.store, execution_id)
    if latest == execution_id:
        return execution_id
    return f"{latest} (the latest run of {execution_id}, which continued as new)"


async def release(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    execution_id = await resolve_id(engine, args.id)
    await engine.release(execution_id)
    console.print(f"released {execution_id}: a worker leases it again at once", highlight=False)
    return EXIT_OK


async def cancel(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    execution_id = await resolve_id(engine, args.id)
    # a run that continued as new hands a cancel on to the chain's latest run, as a handle does
    latest = await latest_run(engine.store, execution_id)
    record = await engine.describe(latest)
    if record.status in ENDED:
        raise UsageError(
            f"execution {latest} already ended ({record.status}): there is nothing to cancel"
        )
    await engine.get_handle(execution_id).cancel(args.reason)
    console.print(
        f"asked {await _run_named(engine, execution_id)} to cancel; it is cancelled when it "
        "next wakes or waits",
        highlight=False,
        markup=False,
    )
    return EXIT_OK


async def export(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    target = open_backend(args.to)
    if isinstance(target, MemoryBackend):
        raise UsageError(
            "a memory:// backend lives inside this command and ends with it: the copy would "
            "be lost at once",
            hint="Export to a backend that keeps it: sqlite:///copy.db, nats://..., "
            "redis://... or postgresql://...",
        )
    progress = progress_bar()
    task = progress.add_task("exporting", total=None)

    def advance(done: int, total: int) -> None:
        if not progress.live.is_started:  # shown once the copy begins, not for a refusal
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        report = await export_log(engine.store, target, progress=advance)
    finally:
        progress.stop()
        await target.aclose()
    if args.json:
        print(
            dumps(
                {
                    "streams": report.streams,
                    "events": report.events,
                    "position": report.position,
                    "open_executions": report.open_executions,
                    "inbox_items": report.inbox_items,
                    "definitions": report.definitions,
                    "global_entries": report.global_entries,
                    "verified": report.verified,
                    "mismatches": list(report.mismatches),
                }
            )
        )
    else:
        console.print(
            f"exported {report.events} events of {report.streams} executions "
            f"(log up to position {report.position}) to {args.to}; "
            f"{report.open_executions} not ended were queued; {report.inbox_items} inbox "
            f"items, {report.definitions} step definitions and {report.global_entries} "
            "global-state entries copied",
            highlight=False,
            markup=False,
        )
        for problem in report.mismatches:
            console.print(f"[red]mismatch[/red]: {escape(problem)}", highlight=False)
        if report.verified:
            console.print(
                "verified: event counts, every stream's last version and the global state match"
            )
    return EXIT_OK if report.verified else EXIT_PROBLEM


async def rebuild(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    with progress_bar() as progress:
        task = progress.add_task("rebuilding the executions index", total=None)

        def advance(position: int, target: int) -> None:
            progress.update(task, completed=position, total=target)

        report = await engine.rebuild_projections(progress=advance)
    if args.json:
        print(
            dumps(
                {
                    "events": report.events,
                    "executions": report.executions,
                    "position": report.position,
                    "helpers": report.helpers,
                }
            )
        )
        return EXIT_OK
    console.print(
        f"rebuilt the executions index: {report.executions} executions from {report.events} "
        f"events (log position {report.position}) in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s"
        + (f", {report.helpers} helper processes reading the log" if report.helpers else "")
        + ")",
        highlight=False,
    )
    return EXIT_OK
