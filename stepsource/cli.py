"""The ``stepsource`` command line (also ``python -m stepsource``).

The backend comes from ``--url`` or ``STEPSOURCE_URL`` (default: ``sqlite:///stepsource.db``).
Exit codes: 0 success; 1 the command ran and found a problem; 2 bad usage or a user error
(unknown id, bad input); 3 the backend cannot be reached or read.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import orjson
from rich.console import Console
from rich.table import Table

from stepsource.engine.engine import Engine
from stepsource.errors import BackendUnavailableError, CorruptLogError, StepsourceError

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BACKEND = 0, 1, 2, 3


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _short(value: Any, width: int = 70) -> str:
    text = _json(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _parser() -> argparse.ArgumentParser:
    # --url is accepted before the command and after it (`stepsource worker APP --url URL`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help="backend URL (default: $STEPSOURCE_URL)"
    )
    parser = argparse.ArgumentParser(prog="stepsource", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", parents=[common], help="run seed 000's batch example and show what it recorded"
    )
    sub.add_parser(
        "keygen", parents=[common], help="print a new key for payload encryption at rest"
    )
    worker = sub.add_parser(
        "worker", parents=[common], help="run MODULE:ENGINE's steps until SIGTERM"
    )
    worker.add_argument("target", metavar="MODULE:ENGINE")
    worker.add_argument("--workers", type=int, default=None, help="executions run at once")
    worker.add_argument("--lease-seconds", type=float, default=None)
    ls = sub.add_parser("ls", parents=[common], help="list executions")
    ls.add_argument("--status")
    ls.add_argument("--step")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", parents=[common], help="an execution's record and state")
    show.add_argument("id")
    show.add_argument("--at", type=int, default=None, help="time travel: version (inclusive)")
    show.add_argument("--json", action="store_true")
    history = sub.add_parser("history", parents=[common], help="an execution's history entries")
    history.add_argument("id")
    history.add_argument("--json", action="store_true")
    events = sub.add_parser("events", parents=[common], help="an execution's events")
    events.add_argument("id")
    events.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    url = getattr(args, "url", None) or os.environ.get("STEPSOURCE_URL") or None
    if args.command == "keygen":
        print(base64.b64encode(os.urandom(32)).decode())
        return EXIT_OK
    try:
        return anyio.run(_dispatch, args, url, console)
    except (BackendUnavailableError, CorruptLogError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        return EXIT_BACKEND
    except StepsourceError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        return EXIT_USAGE


async def _dispatch(args: argparse.Namespace, url: str | None, console: Console) -> int:
    if args.command == "demo":
        return await _demo(url, console)
    if args.command == "worker":
        from stepsource.worker_cli import run_worker

        return await run_worker(
            args.target, url=url, workers=args.workers, lease_seconds=args.lease_seconds
        )
    engine = Engine(url, workers=0)
    try:
        if args.command == "ls":
            return await _ls(engine, args, console)
        if args.command == "show":
            return await _show(engine, args, console)
        if args.command == "history":
            return await _history(engine, args, console)
        return await _events(engine, args, console)
    finally:
        await engine.aclose()


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


async def _ls(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    rows = await engine.executions(status=args.status, step_id=args.step, limit=args.limit)
    if args.json:
        print(
            _json(
                [
                    {
                        "execution_id": r.execution_id,
                        "step_id": r.step_id,
                        "status": r.status,
                        "attempt": r.attempt,
                        "created_at": r.created_at,
                    }
                    for r in rows
                ]
            )
        )
        return EXIT_OK
    table = Table(title="executions")
    for column in ("id", "step", "status", "attempt", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.execution_id, r.step_id, r.status, str(r.attempt), r.created_at.isoformat())
    console.print(table)
    return EXIT_OK


async def _show(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    record = await engine.describe(args.id, at_version=args.at)
    state = await engine.state_of(args.id, at_version=args.at)
    if args.json:
        print(_json({"record": record, "state": state}))
        return EXIT_OK
    console.print(
        f"[bold]{record.id}[/bold] {record.step_id}@{record.step_version}: {record.status}"
    )
    console.print(f"version {record.version}, attempts {len(record.executions)}")
    console.print(f"input  {_short(record.input, 200)}")
    console.print(f"output {_short(record.output, 200)}")
    console.print(f"state  {_short(state, 200)}")
    return EXIT_OK


async def _history(engine: Engine, args: argparse.Namespace, console: Console) -> int:
    if args.json:
        print(_json(await engine.history_of(args.id)))
        return EXIT_OK
    await _print_history(engine, args.id, console)
    return EXIT_OK


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
        data = {
            k: v
            for k, v in vars(e).items()
            if k not in ("originator_id", "originator_version", "timestamp")
        }
        table.add_row(
            str(e.originator_version), e.timestamp.isoformat(), type(e).__name__, _short(data)
        )
    console.print(table)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
