"""The ``stepsource`` command line (also ``python -m stepsource``).

The backend comes from ``--url`` or ``STEPSOURCE_URL`` (default: ``sqlite:///stepsource.db``);
``--url`` is accepted before the command and after it. Tables are for people; ``--json``
prints data for programs on stdout (progress bars and errors go to stderr).

Exit codes: 0 success; 1 the command ran and found a problem (a divergence, an export that
does not verify); 2 bad usage or a user error (unknown id, bad input, bad JSON); 3 the
backend cannot be reached or read.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stepsource.adapters.urls import open_backend
from stepsource.aggregates import events as ev
from stepsource.engine.engine import Engine
from stepsource.engine.export import export_log
from stepsource.engine.verify import ReplayReport, replay_execution
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
    UnknownStepError,
    UsageError,
)
from stepsource.projections.executions_index import STATUSES, summary_json

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BACKEND = 0, 1, 2, 3

#: how often ``tail`` looks for new events
TAIL_POLL = 0.2
#: the width of output that is not a terminal
WIDE = 200


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _short(value: Any, width: int = 70) -> str:
    text = _json(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _json_arg(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(
            f"{what} is not JSON: {exc}",
            hint="Quote it for the shell, e.g. '{\"approved\": true}' or '\"text\"'",
        ) from None


def _since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r} is not an ISO 8601 date or time",
            hint="For example --since 2025-01-31 or --since 2025-01-31T12:00:00+00:00",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    # --url is accepted before the command and after it (`stepsource worker APP --url URL`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help="backend URL (default: $STEPSOURCE_URL)"
    )
    parser = argparse.ArgumentParser(
        prog="stepsource",
        description=__doc__,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for programs")

    command("demo", "run seed 000's batch example and show what it recorded")
    command("keygen", "print a new key for payload encryption at rest")
    worker = command("worker", "run MODULE:ENGINE's steps until SIGTERM")
    worker.add_argument("target", metavar="MODULE:ENGINE")
    worker.add_argument("--workers", type=int, default=None, help="executions run at once")
    worker.add_argument("--lease-seconds", type=float, default=None)

    ui = command("ui", "serve the web time-travel debugger (the `ui` extra)")
    ui.add_argument("--app", help="MODULE:ENGINE whose engine to serve (or $STEPSOURCE_APP)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=8765)
    ui.add_argument("--read-only", action="store_true", help="no signal/event/update/cancel")
    ui.add_argument("--token", help="access token (generated when binding beyond loopback)")

    ls = command("ls", "list executions, newest first")
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--step", help="only this step id")
    ls.add_argument("--flow", help="only this flow id")
    ls.add_argument("--since", type=_since, help="scheduled at or after (ISO 8601; UTC if naive)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--cursor", help="the last execution id of the previous page")
    json_flag(ls)

    show = command("show", "an execution's record and state")
    show.add_argument("id")
    show.add_argument("--at", type=int, default=None, help="time travel: version (inclusive)")
    json_flag(show)
    history = command("history", "an execution's history entries")
    history.add_argument("id")
    json_flag(history)
    events = command("events", "an execution's events")
    events.add_argument("id")
    json_flag(events)

    replay = command("replay", "re-run the handler against one execution's record")
    replay.add_argument("id")
    replay.add_argument("--app", help="MODULE:ENGINE registering the step (or $STEPSOURCE_APP)")
    replay.add_argument("--at", type=int, default=None, help="replay up to this version")
    json_flag(replay)
    verify = command("verify", "replay every execution; exit 1 on any divergence")
    verify.add_argument("--app", help="MODULE:ENGINE registering the steps (or $STEPSOURCE_APP)")
    verify.add_argument("--step", help="only executions of this step id")
    json_flag(verify)

    tail = command("tail", "follow new events of every execution, from the end of the log")
    tail.add_argument("--limit", type=int, default=None, help="stop after N events")
    json_flag(tail)

    for name, what in (("signal", "signal"), ("send-event", "event")):
        message = command(name, f"send a {what} to an execution")
        message.add_argument("id")
        message.add_argument("name")
        message.add_argument("payload", nargs="?", default="null", metavar="JSON")
    cancel = command("cancel", "ask an execution to cancel")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="cancelled from the command line")

    export = command("export", "copy the whole log into another (empty) backend")
    export.add_argument("--to", required=True, metavar="URL", help="the target backend URL")
    json_flag(export)

    projections = command("projections", "manage the read models")
    actions = projections.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = actions.add_parser(
        "rebuild", parents=[common], help="drop the read models and rebuild them from the log"
    )
    json_flag(rebuild)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # piped output is not wrapped at 80 columns: scripts grep whole lines
    console = Console() if sys.stdout.isatty() else Console(width=WIDE, soft_wrap=True)
    url = getattr(args, "url", None) or os.environ.get("STEPSOURCE_URL") or None
    if args.command == "keygen":
        print(base64.b64encode(os.urandom(32)).decode())
        return EXIT_OK
    try:
        if args.command == "ui":
            return _ui(args, url)
        # the app's module is imported outside the event loop, as `python -m` would
        app = _app_engine(args, url) if args.command in ("replay", "verify") else None
        return anyio.run(_dispatch, args, url, console, app)
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "tail" else 130
    except (BackendUnavailableError, CorruptLogError) as error:
        _error(error)
        return EXIT_BACKEND
    except StepsourceError as error:
        _error(error)
        return EXIT_USAGE


def _error(error: BaseException) -> None:
    Console(stderr=True, width=None if sys.stderr.isatty() else WIDE, soft_wrap=True).print(
        f"[red]error:[/red] {error}", highlight=False
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True, width=None if sys.stderr.isatty() else WIDE),
        transient=False,
    )


Command = Callable[[Engine, argparse.Namespace, Console], Awaitable[int]]


async def _dispatch(
    args: argparse.Namespace, url: str | None, console: Console, app: Engine | None
) -> int:
    if args.command == "demo":
        return await _demo(url, console)
    if args.command == "worker":
        from stepsource.worker_cli import run_worker

        return await run_worker(
            args.target, url=url, workers=args.workers, lease_seconds=args.lease_seconds
        )
    engine = app if app is not None else Engine(url, workers=0)
    commands: dict[str, Command] = {
        "ls": _ls,
        "show": _show,
        "history": _history,
        "events": _events,
        "replay": _replay,
        "verify": _verify,
        "tail": _tail,
        "signal": _message,
        "send-event": _message,
        "cancel": _cancel,
        "export": _export,
        "projections": _rebuild,
    }
    try:
        return await commands[args.command](engine, args, console)
    finally:
        await engine.aclose()


def _app_engine(args: argparse.Namespace, url: str | None) -> Engine:
    from stepsource.worker_cli import load_engine

    target = args.app or os.environ.get("STEPSOURCE_APP")
    if not target:
        raise UsageError(
            f"`stepsource {args.command}` needs the handler code: --app MODULE:ENGINE",
            hint="The module is imported (run from its directory or set PYTHONPATH); "
            "or set STEPSOURCE_APP",
        )
    try:
        base = load_engine(target)
    except StepsourceError:
        raise
    except Exception as error:  # noqa: BLE001 - the app's own import-time failure
        raise UsageError(
            f"importing {target!r} failed: {type(error).__name__}: {error}",
            hint="The module must import cleanly and define a stepsource Engine",
        ) from None
    return base.derive(url=url, workers=0)


def _ui(args: argparse.Namespace, url: str | None) -> int:
    from stepsource.ui_cli import run_ui

    has_app = args.app or os.environ.get("STEPSOURCE_APP")
    engine = _app_engine(args, url) if has_app else Engine(url, workers=0)
    return run_ui(
        engine, host=args.host, port=args.port, read_only=args.read_only, token=args.token
    )


# -- demo ------------------------------------------------------------------------------------
async def _demo(url: str | None, console: Console) -> int:
    from stepsource import demo

    engine = Engine(url, workers=2, poll_interval=0.05)
    demo.register(engine)
    console.print(
        f"[bold]stepsource demo[/bold]: seed 000's batch example on {url or 'sqlite:///stepsource.db'}"
    )
    async with engine:
        handle = await engine.start(demo.STEP_ID, {"items": demo.sample_items(), "batch_size": 10})
        console.print(f"started execution {handle.execution_id}")
        output = await handle.result(timeout=60)
    assert isinstance(output, dict)
    assert isinstance(output["results"], list)
    console.print(
        f"\n[bold]result[/bold]: totalItems={output['totalItems']} "
        f"processedCount={output['processedCount']} failedCount={output['failedCount']}"
    )
    for row in output["results"]:
        if isinstance(row, dict) and not row.get("success"):
            console.print(f"  failed: {row['id']}: {row['error']}")
    await _print_history(engine, handle.execution_id, console)
    checkpoints = await engine.checkpoints_of(handle.execution_id)
    table = Table(title="checkpoints")
    for column in ("version", "id", "metadata", "cursor", "items", "accumulated results"):
        table.add_column(column)
    for cp in checkpoints:
        table.add_row(
            str(cp.version),
            cp.id[:8],
            _short(cp.metadata),
            _short(cp.cursor),
            str(cp.items_processed),
            _short(cp.accumulated_results),
        )
    console.print(table)
    earlier = checkpoints[1].version if len(checkpoints) > 1 else 1
    console.print(f"\n[bold]state at version {earlier}[/bold] (time travel):")
    console.print(_json(await engine.state_of(handle.execution_id, at_version=earlier)))
    console.print("[bold]state now[/bold]:")
    console.print(_json(await engine.state_of(handle.execution_id)))
    record = await engine.describe(handle.execution_id)
    console.print(
        f"\nstatus={record.status} attempts={len(record.executions)} events={record.version}"
    )
    return EXIT_OK


# -- queries ---------------------------------------------------------------------------------
async def _print_history(engine: Engine, execution_id: str, console: Console) -> None:
    table = Table(title="history")
    for column in ("version", "timestamp", "type", "details"):
        table.add_column(column)
    for entry in await engine.history_of(execution_id):
        table.add_row(
            str(entry.version),
            entry.timestamp.strftime("%H:%M:%S.%f")[:-3],
            entry.type,
            _short(entry.details),
        )
    console.print(table)


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%m-%d %H:%M:%S")


async def _ls(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    rows = await engine.executions(
        status=args.status,
        step_id=args.step,
        flow_id=args.flow,
        since=args.since,
        limit=args.limit,
        offset=args.offset,
        cursor=args.cursor,
    )
    if args.json:
        print(_json([summary_json(r) for r in rows]))
        return EXIT_OK
    table = Table(title="executions (newest first)")
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("step", "status", "attempt", "events", "created", "error"):
        table.add_column(column, overflow="fold")
    for r in rows:
        error = "" if r.last_error is None else str(r.last_error.get("message", ""))
        table.add_row(
            r.execution_id,
            f"{r.step_id}@{r.step_version}",
            r.status,
            str(r.attempt),
            str(r.version),
            _when(r.created_at),
            error[:60],
        )
    console.print(table)
    if rows and len(rows) == args.limit:
        console.print(f"next page: stepsource ls --cursor {rows[-1].execution_id}", highlight=False)
    return EXIT_OK


async def _show(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    record = await engine.describe(args.id, at_version=args.at)
    state = await engine.state_of(args.id, at_version=args.at)
    if args.json:
        print(_json({"record": record, "state": state}))
        return EXIT_OK
    at = f" (at version {args.at})" if args.at is not None else ""
    console.print(
        f"[bold]{record.id}[/bold] {record.step_id}@{record.step_version}: {record.status}{at}",
        highlight=False,
    )
    console.print(
        f"version {record.version}, attempts {len(record.executions)}, "
        f"retries {record.retry_count}/{record.max_retries}, worker {record.worker_id}",
        highlight=False,
    )
    for label, value in (
        ("input", record.input),
        ("output", record.output),
        ("state", state),
        ("error", record.error),
    ):
        if value is not None:
            console.print(f"{label:<6} {_short(value, 200)}", highlight=False)
    return EXIT_OK


async def _history(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.json:
        print(_json(await engine.history_of(args.id)))
        return EXIT_OK
    await _print_history(engine, args.id, console)
    return EXIT_OK


def _event_data(event: ev.ExecutionEvent) -> dict[str, Any]:
    skip = ("originator_id", "originator_version", "timestamp")
    return {k: v for k, v in vars(event).items() if k not in skip}


async def _events(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    events = await engine.events(args.id)
    if args.json:
        print(
            _json(
                [
                    {
                        "version": e.originator_version,
                        "type": type(e).__name__,
                        **{k: v for k, v in vars(e).items() if k != "originator_id"},
                    }
                    for e in events
                ]
            )
        )
        return EXIT_OK
    table = Table(title=f"events of {args.id}")
    for column in ("version", "timestamp", "event", "data"):
        table.add_column(column)
    for e in events:
        table.add_row(
            str(e.originator_version),
            e.timestamp.isoformat(),
            type(e).__name__,
            _short(_event_data(e)),
        )
    console.print(table)
    return EXIT_OK


# -- replay and verify -----------------------------------------------------------------------
def _report_json(report: ReplayReport) -> dict[str, Any]:
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


async def _replay(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    report = await replay_execution(engine, args.id, args.at)
    if args.json:
        print(_json(_report_json(report)))
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
    console.print(f"[red]divergence[/red]: {divergence.message}", highlight=False)
    return EXIT_PROBLEM


async def _verify(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    ids: list[str] = []
    cursor: str | None = None
    while page := await engine.executions(step_id=args.step, limit=500, cursor=cursor):
        ids.extend(r.execution_id for r in page)
        cursor = page[-1].execution_id
    ids.reverse()  # oldest first
    registered = set(engine.step_ids())
    results: list[dict[str, Any]] = []
    diverged = skipped = 0
    with _progress() as progress:
        task = progress.add_task("verifying", total=len(ids))
        for execution_id in ids:
            try:
                report = await replay_execution(engine, execution_id)
            except UnknownStepError as error:
                skipped += 1
                results.append({"execution_id": execution_id, "skipped": error.step_id})
            else:
                results.append(_report_json(report))
                if not report.ok:
                    diverged += 1
                    assert report.divergence is not None
                    if not args.json:
                        progress.console.print(
                            f"[red]divergence[/red] {report.divergence.message}", highlight=False
                        )
            progress.advance(task)
    summary = (
        f"verified {len(ids)} executions: {len(ids) - diverged - skipped} ok, "
        f"{diverged} diverged, {skipped} skipped (step not registered in the app: "
        f"registered {', '.join(sorted(registered)) or 'none'})"
        if skipped
        else f"verified {len(ids)} executions: {len(ids) - diverged} ok, {diverged} diverged"
    )
    if args.json:
        print(
            _json(
                {
                    "executions": len(ids),
                    "diverged": diverged,
                    "skipped": skipped,
                    "results": results,
                }
            )
        )
    else:
        console.print(summary, highlight=False)
    return EXIT_PROBLEM if diverged else EXIT_OK


# -- following the log -----------------------------------------------------------------------
async def _tail(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, not {args.limit}")
    store = engine._store
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
                }
                print(_json(line), flush=True)
            else:
                console.print(
                    f"{record.position:>7} {event.timestamp.strftime('%H:%M:%S.%f')[:-3]} "
                    f"{record.stream_id} v{record.version:<4} {type(event).__name__:<18} "
                    f"{step} {_short(_event_data(event), 60)}",
                    highlight=False,
                    soft_wrap=True,
                )
            printed += 1
            if args.limit is not None and printed >= args.limit:
                break
    return EXIT_OK


async def _step_of(engine: Engine, execution_id: str, event: ev.ExecutionEvent) -> str:
    if isinstance(event, ev.StepScheduled):
        return event.step_id
    first = await engine._store.events(execution_id, 1, 1)
    return first[0].step_id if first and isinstance(first[0], ev.StepScheduled) else "?"


# -- messages --------------------------------------------------------------------------------
async def _message(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    payload = _json_arg(args.payload, "the payload")
    handle = engine.get_handle(args.id)
    if args.command == "signal":
        await handle.signal(args.name, payload)
        what = "signal"
    else:
        await handle.send_event(args.name, payload)
        what = "event"
    console.print(f"sent {what} {args.name!r} to {handle.execution_id}", highlight=False)
    return EXIT_OK


async def _cancel(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    handle = engine.get_handle(args.id)
    await handle.cancel(args.reason)
    console.print(
        f"asked {handle.execution_id} to cancel; it is cancelled when it next wakes or waits",
        highlight=False,
    )
    return EXIT_OK


# -- export and read models ------------------------------------------------------------------
async def _export(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    target = open_backend(args.to)
    progress = _progress()
    task = progress.add_task("exporting", total=None)

    def advance(done: int, total: int) -> None:
        if not progress.live.is_started:  # shown once the copy begins, not for a refusal
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        report = await export_log(engine._store, target, progress=advance)
    finally:
        progress.stop()
        await target.aclose()
    if args.json:
        print(
            _json(
                {
                    "streams": report.streams,
                    "events": report.events,
                    "position": report.position,
                    "open_executions": report.open_executions,
                    "inbox_items": report.inbox_items,
                    "definitions": report.definitions,
                    "verified": report.verified,
                    "mismatches": list(report.mismatches),
                }
            )
        )
    else:
        console.print(
            f"exported {report.events} events of {report.streams} executions "
            f"(log up to position {report.position}) to {args.to}; "
            f"{report.open_executions} not ended were queued, {report.inbox_items} inbox items "
            f"and {report.definitions} step definitions copied",
            highlight=False,
        )
        for problem in report.mismatches:
            console.print(f"[red]mismatch[/red]: {problem}", highlight=False)
        if report.verified:
            console.print("verified: event counts and every stream's last version match")
    return EXIT_OK if report.verified else EXIT_PROBLEM


async def _rebuild(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    with _progress() as progress:
        task = progress.add_task("rebuilding the executions index", total=None)

        def advance(position: int, target: int) -> None:
            progress.update(task, completed=position, total=target)

        report = await engine.rebuild_projections(progress=advance)
    if args.json:
        print(
            _json(
                {
                    "events": report.events,
                    "executions": report.executions,
                    "position": report.position,
                }
            )
        )
        return EXIT_OK
    console.print(
        f"rebuilt the executions index: {report.executions} executions from {report.events} "
        f"events (log position {report.position}) in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s)",
        highlight=False,
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
