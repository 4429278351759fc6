"""``stepsource replay`` and ``stepsource verify``: re-run handler code against the record."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepsource.engine.engine import Engine
from stepsource.engine.verify import ReplayReport
from stepsource.errors import CorruptLogError, UnknownEventError, UnknownStepError

from .cli_output import EXIT_OK, EXIT_PROBLEM, dumps, progress_bar, resolve_id

__all__ = ["replay", "report_json", "verify"]


def report_json(report: ReplayReport) -> dict[str, Any]:
    divergence = report.divergence
    return {
        "execution_id": report.execution_id,
        "step_id": report.step_id,
        "status": report.status,
        "events": report.events,
        "at_version": report.at_version,
        "ok": report.ok,
        "attempts": [
            {
                "attempt": a.attempt,
                "step_version": a.step_version,
                "from_version": a.from_version,
                "to_version": a.to_version,
                "recorded": a.recorded,
                "matched": a.matched,
                "outcome": a.outcome,
            }
            for a in report.attempts
        ],
        "divergence": None
        if divergence is None
        else {
            "attempt": divergence.attempt,
            "message": divergence.message,
            "recorded": divergence.recorded,
            "version": divergence.version,
            "attempted": divergence.attempted,
        },
    }


async def replay(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    report = await engine.replay(await resolve_id(engine, args.id), args.at)
    if args.json:
        print(dumps(report_json(report)))
        return EXIT_OK if report.ok else EXIT_PROBLEM
    upto = f" up to version {args.at}" if args.at is not None else ""
    console.print(
        f"[bold]replay[/bold] of {report.execution_id} ({report.step_id}, {report.status}, "
        f"{report.events} events{upto})",
        highlight=False,
    )
    table = Table()
    for column in ("attempt", "handler", "events", "recorded ops", "matched", "outcome"):
        table.add_column(column, overflow="fold")
    for a in report.attempts:
        table.add_row(
            str(a.attempt),
            a.step_version,
            f"{a.from_version}..{a.to_version}",
            str(a.recorded),
            str(a.matched),
            a.outcome,
        )
    console.print(table)
    divergence = report.divergence
    if divergence is None:
        console.print("[green]ok[/green]: the code replays the record exactly")
        return EXIT_OK
    console.print(f"[red]divergence[/red]: {escape(divergence.message)}", highlight=False)
    return EXIT_PROBLEM


async def verify(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    ids: list[str] = []
    cursor: str | None = None
    while page := await engine.executions(step_id=args.step, limit=500, cursor=cursor):
        ids.extend(r.execution_id for r in page)
        cursor = page[-1].execution_id
    ids.reverse()  # oldest first
    registered = set(engine.step_ids())
    results: list[dict[str, Any]] = []
    diverged = skipped = unreadable = 0
    with progress_bar() as progress:
        task = progress.add_task("verifying", total=len(ids))
        for execution_id in ids:
            try:
                report = await engine.replay(execution_id)
            except UnknownStepError as error:
                skipped += 1
                results.append({"execution_id": execution_id, "skipped": error.step_id})
            except (UnknownEventError, CorruptLogError) as error:  # quarantined: said, not fatal
                unreadable += 1
                results.append({"execution_id": execution_id, "unreadable": error.reason})
                if not args.json:
                    progress.console.print(
                        f"[red]unreadable[/red] {execution_id}: {escape(error.reason)}",
                        highlight=False,
                    )
            else:
                results.append(report_json(report))
                if not report.ok:
                    diverged += 1
                    assert report.divergence is not None
                    if not args.json:
                        progress.console.print(
                            f"[red]divergence[/red] {escape(report.divergence.message)}",
                            highlight=False,
                        )
            progress.advance(task)
    ok = len(ids) - diverged - skipped - unreadable
    summary = (
        f"verified {len(ids)} executions: {ok} ok, "
        f"{diverged} diverged, {skipped} skipped (step not registered in the app: "
        f"registered {', '.join(sorted(registered)) or 'none'})"
        if skipped
        else f"verified {len(ids)} executions: {ok} ok, {diverged} diverged"
    )
    if unreadable:
        summary += f", {unreadable} unreadable (quarantined: see `stepsource check`)"
    if args.json:
        print(
            dumps(
                {
                    "executions": len(ids),
                    "diverged": diverged,
                    "skipped": skipped,
                    "unreadable": unreadable,
                    "results": results,
                }
            )
        )
    else:
        console.print(summary, highlight=False)
    return EXIT_PROBLEM if diverged or unreadable else EXIT_OK
