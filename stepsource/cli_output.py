"""What every ``stepsource`` command shares: exit codes, JSON and table formatting, consoles,
progress bars, and turning what the user typed (JSON, dates, execution ids) into values."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stepsource.engine.engine import Engine
from stepsource.engine.store import parse_execution_id
from stepsource.errors import UnknownExecutionError, UsageError

__all__ = [
    "EXIT_BACKEND",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "STATUS_STYLES",
    "Command",
    "console_for",
    "dumps",
    "json_arg",
    "print_error",
    "progress_bar",
    "resolve_id",
    "short",
    "short_id",
    "since",
]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_BACKEND = 0, 1, 2, 3

#: the width of output that is not a terminal (unless $COLUMNS says otherwise)
WIDE = 200
#: the characters of an execution id shown in tables (the command line accepts a unique prefix)
SHORT_ID = 8

STATUS_STYLES = {
    "scheduled": "cyan",
    "executing": "blue",
    "waiting": "magenta",
    "throttled": "magenta",
    "retrying": "yellow",
    "completed": "green",
    "failed": "red",
    "cancelled": "dim",
    "quarantined": "bold red",
    "parked": "bold yellow",
}

Command = Callable[[Engine, argparse.Namespace, Console], Awaitable[int]]


def _width(stream: Any) -> int | None:
    """A terminal's own width; else $COLUMNS; else wide (scripts grep whole lines)."""
    if stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else WIDE


class _CommandConsole(Console):
    """rich's console, whose reader going away ends the command as ``print`` does: rich
    exits with status 1 then (``show ID | head -c 10`` failed a ``pipefail`` script)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError  # the CLI's main() ends quietly, exit 0


def console_for(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return _CommandConsole(stderr=stderr, width=_width(stream), soft_wrap=not stream.isatty())


def print_error(error: BaseException) -> None:
    # escaped: a hint such as pip install 'stepsource[nats]' is text, not rich markup
    console_for(stderr=True).print(f"[red]error:[/red] {escape(str(error))}", highlight=False)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True, width=_width(sys.stderr)),
        transient=False,
    )


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def short(value: Any, width: int = 70) -> str:
    text = dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def short_id(execution_id: str) -> str:
    return execution_id[:SHORT_ID]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_arg(text: str, what: str) -> Any:
    """Parse a JSON argument as the API would receive it: integers stay exact (the engine
    then refuses one past 64 bits, as it refuses it from Python), never a float; NaN and
    Infinity are refused."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise UsageError(
            f"{what} is not JSON: {str(exc)[:200]}",
            hint="Quote it for the shell, e.g. '{\"approved\": true}' or '\"text\"'",
        ) from None


#: the largest count or version a backend stores (a signed 64-bit integer)
MAX_COUNT = 2**63 - 1


def count(text: str) -> int:
    """A whole number from 0 to 2**63-1 (a limit, an offset, a version, a worker count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if not 0 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text[:40]} is not from 0 to 2**63-1")
    return value


def positive(text: str) -> int:
    """A whole number from 1 to 2**63-1 (a limit that must read something)."""
    value = count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not from 1 to 2**63-1")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text[:40]} is not a finite number of seconds >= 0")
    return value


def port(text: str) -> int:
    """A TCP port: 1 to 65535, or 0 for one the system picks (said once listening)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value


def since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r} is not an ISO 8601 date or time",
            hint="For example --since 2025-01-31 or --since 2025-01-31T12:00:00+00:00",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_PREFIX = re.compile(r"[0-9a-fA-F-]{4,36}")
_SHORT = re.compile(r"[0-9a-fA-F-]{1,3}")


async def resolve_id(engine: Engine, text: str) -> str:
    """A full execution id from a full id or a unique prefix of one (as ``ls`` shows)."""
    try:
        return parse_execution_id(text)
    except UnknownExecutionError:
        if _SHORT.fullmatch(text):
            raise UsageError(
                f"{text!r} is too short to pick an execution",
                hint="Give at least 4 characters of its id, as `stepsource ls` shows it",
            ) from None
        if not _PREFIX.fullmatch(text):
            raise
    prefix = text.lower()
    found: list[str] = []
    cursor: str | None = None
    while page := await engine.executions(limit=500, cursor=cursor):
        found.extend(r.execution_id for r in page if r.execution_id.startswith(prefix))
        if len(found) > 1:
            raise UsageError(
                f"{text!r} is the start of several execution ids ({', '.join(found[:3])}...)",
                hint="Type more of the id (`stepsource ls --json` prints whole ids)",
            )
        cursor = page[-1].execution_id
    if not found:
        raise UnknownExecutionError(
            f"no execution id starts with {text!r} in this backend",
            hint="Check the id and the backend URL (--url or STEPSOURCE_URL)",
        )
    return found[0]
