"""Shared pieces of the benchmark suite: the child-process protocol, timing and profiling.

Every workload module runs as its own process (``python -m bench.<module> --params JSON``),
so one system's threads, caches and global state never disturb another's numbers. A module
measures each of its metrics ``runs`` times and prints one line ``BENCH-RESULT {json}``:

    {"metrics": {metric_id: {"runs": [value, ...], "unit": "...", "params": {...}}},
     "durability": {...}, "notes": {...}, "profiles": {metric_id: {...}}}

A metric that could not be measured carries ``"error"`` instead of runs. ``--profile
M1,M2`` runs those metrics once more, uncounted, under pyinstrument (or, for memory,
tracemalloc) and adds a summary of where the time (or memory) went
(see :func:`profile_summary`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
HOST = "127.0.0.1"
#: the row size of the raw SQLite peers, close to a stored StateSet event of stepsource
ROW_BYTES = 300


def remove_db(path: Path | str) -> None:
    """Delete a SQLite file and everything SQLite and stepsource keep beside it."""
    base = str(path)
    for suffix in ("", "-wal", "-shm", "-journal"):
        for name in (base + suffix, base + ".readmodels" + suffix):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


class Recorder:
    """Collects the runs of each metric of one workload module."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[str, Any]] = {}
        self.durability: dict[str, Any] = {}
        self.notes: dict[str, str] = {}
        self.profiles: dict[str, dict[str, Any]] = {}

    def add(self, metric: str, value: float, unit: str, **params: Any) -> None:
        entry = self.metrics.setdefault(metric, {"runs": [], "unit": unit, "params": params})
        entry["runs"].append(value)
        entry["params"].update(params)

    def fail(self, metric: str, error: str) -> None:
        entry = self.metrics.setdefault(metric, {"runs": [], "unit": "", "params": {}})
        entry["error"] = error

    def payload(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "durability": self.durability,
            "notes": self.notes,
            "profiles": self.profiles,
        }


def error_text(exc: BaseException) -> str:
    """One readable paragraph for a report: the exception and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text[:600] + "...") if len(text) > 600 else text + where


def _parse_frame(info: str) -> tuple[str, str, str]:
    identifier = info.split("\x01", 1)[0]
    parts = identifier.split("\x00")
    function = parts[0] if parts else "?"
    path = parts[1] if len(parts) > 1 else ""
    line = parts[2] if len(parts) > 2 else ""
    return function, path, line


def _short(path: str) -> str:
    marker = "site-packages/"
    if marker in path:
        return path.split(marker, 1)[1]
    for root in ("/engine/", "/adapters/", "/aggregates/", "/projections/", "/stepsource/"):
        if root in path:
            return root.strip("/") + "/" + path.split(root, 1)[1]
    return Path(path).name if path else "?"


def _layer(path: str, function: str) -> str:
    short = _short(path)
    if "epoll" in function or function in ("select.select", "poll"):
        return "event loop idle (waiting for I/O or a worker thread)"
    if not path or path.startswith("<"):
        return "interpreter / builtins"
    if short.startswith(("engine/", "adapters/", "aggregates/", "projections/", "stepsource/")):
        return "stepsource"
    for name in (
        "eventsourcing",
        "anyio",
        "asyncio",
        "sqlite3",
        "pydantic",
        "orjson",
        "nats",
        "dbos",
        "sqlalchemy",
        "temporalio",
        "threading",
        "concurrent",
    ):
        if short.startswith(name) or f"/{name}/" in path:
            return name
    if "/bench/" in path:
        return "benchmark code"
    return "other"


def profile_summary(session: Any, top: int = 10) -> dict[str, Any]:
    """Where the sampled wall-clock time went: by layer (the innermost frame's package), the
    hottest innermost functions (self time), and the stepsource functions with the most
    inclusive time. pyinstrument samples the thread the workload's event loop runs in, so
    time the loop spends waiting (for the SQLite worker thread, the disk or the network)
    appears as idle time."""
    total = 0.0
    layers: dict[str, float] = defaultdict(float)
    leaves: dict[str, float] = defaultdict(float)
    inclusive: dict[str, float] = defaultdict(float)
    for stack, seconds in ((r[0], r[1]) for r in session.frame_records):
        if not stack:
            continue
        total += seconds
        function, path, line = _parse_frame(stack[-1])
        layers[_layer(path, function)] += seconds
        leaves[f"{function} ({_short(path)}:{line})"] += seconds
        seen: set[str] = set()
        for info in stack:
            fn, fpath, _ = _parse_frame(info)
            if _layer(fpath, fn) != "stepsource":
                continue
            key = f"{fn} ({_short(fpath)})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += seconds

    def ranked(table: dict[str, float]) -> list[list[Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(100 * value / total, 1) if total else 0.0] for name, value in rows]

    return {
        "sampled_seconds": round(total, 3),
        "cpu_seconds": round(float(getattr(session, "cpu_time", 0.0) or 0.0), 3),
        "layers": ranked(layers),
        "self": ranked(leaves),
        "stepsource_inclusive": ranked(inclusive),
    }


@contextlib.contextmanager
def profiled(recorder: Recorder, metric: str) -> Iterator[None]:
    """Profile the block with pyinstrument (a run that is not counted)."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        session = profiler.last_session
        if session is not None:
            recorder.profiles[metric] = {"kind": "cpu", **profile_summary(session)}


def main(
    measure: Callable[[Recorder, dict[str, Any], Path, set[str]], None],
) -> None:
    """The entry point of a workload module: parse the arguments, measure, print the result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="{}", help="JSON object of sizes and options")
    parser.add_argument("--profile", default="", help="comma-separated metrics to profile")
    parser.add_argument("--tmp", default=None, help="a directory for the files of the run")
    args = parser.parse_args()
    params = json.loads(args.params)
    recorder = Recorder()
    with contextlib.ExitStack() as stack:
        if args.tmp:
            tmp = Path(args.tmp)
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        try:
            measure(recorder, params, tmp, {m for m in args.profile.split(",") if m})
        except Exception as exc:  # noqa: BLE001 - the harness reports what failed, per metric
            message = error_text(exc)
            traceback.print_exc(file=sys.stderr)
            for metric in params.get("metrics", []):
                entry = recorder.metrics.get(metric)
                if entry is None or (not entry["runs"] and "error" not in entry):
                    recorder.fail(metric, message)
    sys.stdout.write(RESULT_PREFIX + json.dumps(recorder.payload()) + "\n")
    sys.stdout.flush()
