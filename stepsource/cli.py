"""The `stepsource` command line (also `python -m stepsource`).

The backend comes from --url or $STEPSOURCE_URL (default: sqlite:///stepsource.db), as for
Engine(); --url is accepted before the command and after it. Tables are for people; --json
prints data for programs on stdout (progress bars and errors go to stderr). Commands that
take an execution id accept a unique prefix of one, as `ls` shows it in a narrow terminal.

Exit codes: 0 success; 1 the command ran and found a problem (a divergence, an export that
does not verify, an execution that failed); 2 bad usage or a user error (unknown id, bad
input, bad JSON); 3 the backend cannot be reached or read.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import anyio
from rich.console import Console

from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.urls import open_backend
from stepsource.engine.engine import Engine
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    ResultTimeout,
    StepsourceError,
    UsageError,
)
from stepsource.projections.executions_index import STATUSES

from . import cli_control, cli_inspect, cli_integrity, cli_replay, cli_schedules
from .cli_demo import demo
from .cli_output import (
    EXIT_BACKEND,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    Command,
    console_for,
    count,
    port,
    print_error,
    seconds,
    since,
)

__all__ = ["main"]

#: commands that may create the database; every other one only reads an existing log
CREATING = ("demo", "worker", "start", "keygen")


def _version() -> str:
    try:
        return version("stepsource")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
        return "unknown"


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
    parser.add_argument("--version", action="version", version=f"stepsource {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for programs")

    command("demo", "run the batch-processing example and show what it recorded")
    command("keygen", "print a new key for payload encryption at rest")
    worker = command("worker", "run MODULE:ENGINE's steps until SIGTERM")
    worker.add_argument("target", metavar="MODULE:ENGINE")
    worker.add_argument("--workers", type=count, default=None, help="executions run at once (>= 1)")
    worker.add_argument("--lease-seconds", type=seconds, default=None)
    worker.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="the worker's log level (default INFO: one line per start, end, retry, takeover)",
    )
    worker.add_argument(
        "--log-format", default="text", choices=("text", "json"), help="log lines as text or JSON"
    )
    worker.add_argument(
        "--metrics-port",
        type=port,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (the otel extra)",
    )
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="where --metrics-port listens (127.0.0.1)"
    )

    start = command("start", "start an execution of STEP with the input JSON")
    start.add_argument("step", metavar="STEP")
    start.add_argument("input", nargs="?", default="{}", metavar="JSON")
    start.add_argument("--wait", action="store_true", help="wait for the result and print it")
    start.add_argument("--timeout", type=seconds, default=None, help="with --wait: seconds")
    start.add_argument("--id", default=None, help="the execution id (a UUID; default: new)")
    start.add_argument(
        "--key",
        default=None,
        help="a business key: at most one execution of STEP per key (again: the existing one)",
    )
    start.add_argument(
        "--app", help="MODULE:ENGINE registering the step (default: a worker's published one)"
    )
    json_flag(start)

    ui = command("ui", "serve the web time-travel debugger (the `ui` extra)")
    ui.add_argument("--app", help="MODULE:ENGINE whose engine to serve (or $STEPSOURCE_APP)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=port, default=8765, help="port to listen on (default 8765)")
    ui.add_argument("--read-only", action="store_true", help="no signal/event/update/cancel")
    ui.add_argument("--token", help="access token (generated when binding beyond loopback)")

    ls = command("ls", "list executions, newest first")
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument("--step", help="only this step id")
    ls.add_argument("--flow", help="only this flow id")
    ls.add_argument("--key", help="only those started with this business key")
    ls.add_argument("--since", type=since, help="scheduled at or after (ISO 8601; UTC if naive)")
    ls.add_argument("--limit", type=count, default=50)
    ls.add_argument("--offset", type=count, default=0)
    ls.add_argument("--cursor", help="the last execution id of the previous page")
    json_flag(ls)

    show = command("show", "an execution's record and state")
    show.add_argument("id")
    show.add_argument("--at", type=count, default=None, help="time travel: version (inclusive)")
    json_flag(show)
    history = command("history", "an execution's history entries (and takeovers)")
    history.add_argument("id")
    json_flag(history)
    events = command("events", "an execution's events")
    events.add_argument("id")
    events.add_argument("--from", dest="first", type=count, help="first version shown")
    events.add_argument("--to", dest="last", type=count, help="last version shown")
    json_flag(events)

    replay = command("replay", "re-run the handler against one execution's record")
    replay.add_argument("id")
    replay.add_argument("--app", help="MODULE:ENGINE registering the step (or $STEPSOURCE_APP)")
    replay.add_argument("--at", type=count, default=None, help="replay up to this version")
    json_flag(replay)
    verify = command("verify", "replay every execution; exit 1 on any divergence")
    verify.add_argument("--app", help="MODULE:ENGINE registering the steps (or $STEPSOURCE_APP)")
    verify.add_argument("--step", help="only executions of this step id")
    json_flag(verify)

    tail = command("tail", "follow new events of every execution, from the end of the log")
    tail.add_argument("--limit", type=count, default=None, help="stop after N events")
    json_flag(tail)

    for name, what in (("signal", "a signal"), ("send-event", "an event")):
        message = command(name, f"send {what} to an execution")
        message.add_argument("id")
        message.add_argument("name")
        message.add_argument("payload", nargs="?", default="null", metavar="JSON")
    released = command("release", "put a parked execution back in the queue (after a fix)")
    released.add_argument("id")
    cancel = command("cancel", "ask an execution to cancel")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="cancelled from the command line")

    cli_schedules.add_parser(command, json_flag, common)

    export = command("export", "copy the whole log into another (empty) backend")
    export.add_argument("--to", required=True, metavar="URL", help="the target backend URL")
    json_flag(export)

    check = command(
        "check", "check the storage for damage (files, checksums, gaps, read models); exit 1 on any"
    )
    json_flag(check)
    quarantined = command("quarantine", "executions set aside because their log cannot be read")
    q_actions = quarantined.add_subparsers(dest="action", required=True, metavar="ACTION")
    q_ls = q_actions.add_parser("ls", parents=[common], help="list quarantined executions")
    q_ls.add_argument("--limit", type=count, default=100)
    json_flag(q_ls)
    q_release = q_actions.add_parser(
        "release", parents=[common], help="run ID again once its log reads (after a fix)"
    )
    q_release.add_argument("id")

    projections = command("projections", "manage the read models")
    actions = projections.add_subparsers(dest="action", required=True, metavar="ACTION")
    rebuild = actions.add_parser(
        "rebuild", parents=[common], help="drop the read models and rebuild them from the log"
    )
    json_flag(rebuild)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # the reader went away (`stepsource events --json | head -c 10`): stop quietly; the
        # interpreter's own flush of stdout at exit must not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _undecodable(argv: Sequence[str]) -> str | None:
    """The first argument that is not valid UTF-8 (the OS hands such bytes to Python as lone
    surrogates), or None."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            try:  # the bytes the OS gave, shown with replacement characters
                raw = arg.encode("utf-8", errors="surrogateescape")
            except UnicodeEncodeError:
                raw = arg.encode("utf-8", errors="surrogatepass")
            return raw.decode("utf-8", "replace")
    return None


def _main(argv: list[str]) -> int:
    bad = _undecodable(argv)
    if bad is not None:
        print_error(
            UsageError(
                f"the argument {bad[:80]!r} is not valid UTF-8",
                hint="Pass names, ids and JSON as UTF-8 text (check the terminal's encoding)",
            )
        )
        return EXIT_USAGE
    args = _parser().parse_args(argv)
    console = console_for()
    given = getattr(args, "url", None)
    if given is not None and not given.strip():  # as Engine("") refuses it
        print_error(
            UsageError(
                "--url is empty",
                hint="Give a backend URL (sqlite:///steps.db), or leave --url out for "
                "$STEPSOURCE_URL or ./stepsource.db",
            )
        )
        return EXIT_USAGE
    url = given or os.environ.get("STEPSOURCE_URL") or None
    if args.command == "keygen":
        print(base64.b64encode(os.urandom(32)).decode())
        return EXIT_OK
    try:
        # an app's engine names its own backend: the default file is not the one it reads
        app_named = getattr(args, "app", None) or os.environ.get("STEPSOURCE_APP")
        own_url = url is None and app_named and (args.command == "ui" or _needs_app(args))
        if args.command not in CREATING and not own_url:
            _refuse_missing_database(url)
        if args.command == "ui":
            return _ui(args, url)
        # the app's module is imported outside the event loop, as `python -m` would
        app = _app_engine(args, url) if _needs_app(args) else None
        return anyio.run(_dispatch, args, url, console, app)
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "tail" else 130
    except (BackendUnavailableError, CorruptLogError) as error:
        print_error(error)
        return EXIT_BACKEND
    except ResultTimeout as error:  # it ran and did not end in time: no usage error
        print_error(error)
        return EXIT_PROBLEM
    except StepsourceError as error:
        print_error(error)
        return EXIT_USAGE


def _needs_app(args: argparse.Namespace) -> bool:
    if args.command in ("replay", "verify"):
        return True
    return args.command == "start" and bool(args.app)


def _refuse_missing_database(url: str | None) -> None:
    """A command that only reads must not create an empty SQLite file at a mistyped path."""
    backend = open_backend(url)  # not opened: no I/O
    if isinstance(backend, SQLiteBackend) and not os.path.exists(backend.path):
        raise BackendUnavailableError(
            f"cannot read {backend.path}: there is no such file, and this command does not "
            "create one",
            hint="Check --url or STEPSOURCE_URL (sqlite:///relative.db, sqlite:////abs/path.db); "
            "`stepsource start`, `stepsource worker` and Engine() create the database",
        )


async def _dispatch(
    args: argparse.Namespace, url: str | None, console: Console, app: Engine | None
) -> int:
    if args.command == "demo":
        return await demo(url, console)
    if args.command == "worker":
        from stepsource.worker_cli import run_worker

        return await run_worker(
            args.target,
            url=url,
            workers=args.workers,
            lease_seconds=args.lease_seconds,
            log_level=args.log_level,
            log_format=args.log_format,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
    engine = app if app is not None else Engine(url, workers=0)
    commands: dict[str, Command] = {
        "start": cli_control.start,
        "ls": cli_inspect.ls,
        "show": cli_inspect.show,
        "history": cli_inspect.history,
        "events": cli_inspect.events,
        "replay": cli_replay.replay,
        "verify": cli_replay.verify,
        "tail": cli_inspect.tail,
        "signal": cli_control.message,
        "send-event": cli_control.message,
        "cancel": cli_control.cancel,
        "release": cli_control.release,
        "export": cli_control.export,
        "projections": cli_control.rebuild,
        "check": cli_integrity.check,
        "quarantine": cli_integrity.quarantine,
        "schedules": cli_schedules.schedules,
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
    return load_engine(target).derive(url=url, workers=0)


def _ui(args: argparse.Namespace, url: str | None) -> int:
    from stepsource.ui_cli import run_ui

    has_app = args.app or os.environ.get("STEPSOURCE_APP")
    engine = _app_engine(args, url) if has_app else Engine(url, workers=0)
    return run_ui(
        engine, host=args.host, port=args.port, read_only=args.read_only, token=args.token
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
