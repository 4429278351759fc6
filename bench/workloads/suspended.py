"""(f) Worker RSS with N executions suspended in ``wait_for_event``.

For each size and run, a fresh worker process (:mod:`bench.workloads.suspended_worker`) on a
fresh SQLite file starts N executions and waits until all of them have suspended; this
process then reads the worker's resident set size with psutil (the worker is idle, its
engine still running: lease loop, lease renewals and read-model runner live).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import Recorder, main, remove_db


def one_run(path: Path, count: int, timeout: float, trace: bool = False) -> dict[str, Any]:
    remove_db(path)
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.workloads.suspended_worker",
            str(path),
            str(count),
            *(["trace"] if trace else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        deadline = time.monotonic() + timeout
        report: dict[str, Any] | None = None
        for line in child.stdout:
            if line.startswith("READY "):
                report = json.loads(line[len("READY ") :])
                break
            if time.monotonic() > deadline:
                break
        if report is None:
            child.kill()
            raise RuntimeError(f"the worker did not get {count} executions suspended")
        memory = psutil.Process(child.pid).memory_info()
        child.stdin.close()
        child.wait(timeout=60)
    remove_db(path)
    return {
        "rss_mb": memory.rss / 2**20,
        "baseline_mb": float(report["baseline_rss"]) / 2**20,
        "seconds": float(report["seconds"]),
        "tracemalloc": report.get("tracemalloc"),
    }


def import_rss(modules: list[str]) -> float:
    """The RSS (MB) of a fresh interpreter that imported ``modules`` and does nothing else,
    read with psutil from here: what a worker costs before it holds any execution."""
    code = (
        "import sys\nfor m in sys.argv[1:]: __import__(m)\n"
        "print('READY', flush=True)\nsys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, *modules], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        child.stdout.readline()
        rss = psutil.Process(child.pid).memory_info().rss / 2**20
        child.stdin.close()
        child.wait(timeout=30)
    return float(rss)


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    for _ in range(3):
        recorder.add("python_bare_rss", import_rss([]), "MB")
        recorder.add("ss_import_rss", import_rss(["stepsource", "stepsource.engine.engine"]), "MB")
    for size in params["sizes"]:
        runs = int(params["runs"]) if size <= 10_000 else int(params.get("big_runs", 3))
        for _ in range(runs):
            found = one_run(tmp / f"suspended-{size}.db", size, float(params.get("timeout", 1200)))
            recorder.add(f"ss_suspended_rss_{size}", found["rss_mb"], "MB", executions=size)
            recorder.add(f"ss_suspended_baseline_{size}", found["baseline_mb"], "MB")
            recorder.add(
                f"ss_suspended_rate_{size}",
                size / found["seconds"],
                "executions/s",
                executions=size,
            )
    for size in params["sizes"]:
        metric = f"ss_suspended_rss_{size}"
        if metric in profile:  # traced at a smaller size when the size is large
            traced = min(size, int(params.get("trace_size", size)))
            found = one_run(
                tmp / "traced.db", traced, float(params.get("timeout", 1200)), trace=True
            )
            recorder.profiles[metric] = {
                "kind": "memory",
                "traced_executions": traced,
                "rss_mb_traced": round(found["rss_mb"], 1),
                "baseline_mb": round(found["baseline_mb"], 1),
                **(found["tracemalloc"] or {}),
            }


if __name__ == "__main__":
    main(measure)
