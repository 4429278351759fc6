"""The benchmark harness runs end to end in quick mode (tiny sizes, a temporary directory) and
writes results.json and REPORT.md covering every workload. Nothing here is about speed: the
numbers of a quick run mean nothing, and no assertion reads them.

The stepsource workloads must have been measured; a peer that is not installed or cannot
run here may instead be reported with its error (the report says so). The harness needs the
``bench`` extra (psutil, pyinstrument); ``make bench-quick``, the last step of ``make
test``, installs it and runs the same quick suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "a": "(a) sequential appends",
    "b": "(b) concurrent appends",
    "c": "(c) empty step end to end",
    "r": "(r) a batch handler end to end",
    "d": "(d) replay and resume",
    "e": "(e) projection rebuild",
    "f": "(f) suspended executions",
    "g": "(g) NATS JetStream",
    "h": "(h) Redis",
    "p": "(p) PostgreSQL",
    "u": "(u) the web UI on a big log (server-side)",
}
TARGETS = {
    "a1",
    "a2",
    "a3",
    "b1",
    "b2",
    "r1",
    "r2",
    "c1",
    "c2",
    "d1",
    "d3",
    "e",
    "f",
    "g",
    "o1",
    "h1",
    "h2",
    "p1",
    "p2",
    "p3",
    "p4",
    "p5",
    "u1",
    "u2",
    "u3",
}
STEPSOURCE_METRICS = {
    "ss_seq_set_state_boundary",
    "ss_seq_set_state_each",
    "ss_seq_do",
    "ss_concurrent_boundary",
    "ss_concurrent_each",
    "ss_e2e_seq",
    "ss_e2e_conc50",
    "ss_batch_seq",
    "ss_batch_conc50",
    "ss_batch_seq_observed",
    "ss_replay_full_1000",
    "ss_replay_snapshot_1000",
    "ss_resume_fresh",
    "ss_resume_after_history",
    "ss_rebuild",
    "ss_suspended_rss_1000",
    "ss_nats_seq_set_state",
    "ss_nats_concurrent_appends",
    "ss_redis_seq_do",
    "ss_redis_concurrent_appends",
    "ss_pg_seq_do",
    "ss_pg_e2e_seq",
    "ss_pg_e2e_conc50",
    "ss_pg_batch_seq",
    "ss_pg_batch_conc50",
    "ui_list_first_page",
    "ui_list_filtered",
    "ui_execution_page",
    "ui_scrub_move",
}
#: commits per unit of work, counted in the run: what the floors divide the raw rate by
COMMIT_COUNTS = {
    "ss_seq_set_state_boundary_commits",
    "ss_seq_set_state_each_commits",
    "ss_seq_do_commits",
    "ss_e2e_seq_commits",
    "ss_batch_seq_commits",
}
PEER_METRICS = {
    "raw_sqlite_1row",
    "raw_sqlite_100rows",
    "es_saves",
    "es_replay_1000",
    "dbos_steps_seq",
    "dbos_wf_seq",
    "dbos_wf_conc50",
    "dbos_batch_seq",
    "dbos_batch_conc50",
    "dbos_replay",
    "temporal_activities_seq",
    "temporal_local_activities_seq",
    "temporal_wf_seq",
    "temporal_wf_conc50",
    "temporal_replay",
    "nats_raw_sync",
    "nats_raw_pipelined",
    "redis_raw_sync",
    "redis_raw_pipelined",
    "raw_pg_1row",
    "dbos_pg_wf_seq",
    "dbos_pg_wf_conc50",
    "dbos_pg_batch_seq",
    "dbos_pg_batch_conc50",
}


@pytest.mark.slow
def test_quick_run_writes_results_and_report_for_every_workload(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="the bench extra is not installed (make bench-quick)")
    pytest.importorskip("pyinstrument", reason="the bench extra is not installed")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    report = (out / "REPORT.md").read_text()

    assert results["mode"] == "quick"
    assert results["machine"]["cpu_count"] >= 1
    assert "stepsource" in results["versions"]
    metrics: dict[str, dict[str, Any]] = results["metrics"]
    for name in STEPSOURCE_METRICS:
        entry = metrics[name]
        assert "error" not in entry, (name, entry.get("error"))
        assert "partial_errors" not in entry, (name, entry["partial_errors"])  # a round failed
        assert len(entry["runs"]) >= 3
        assert entry["min"] <= entry["median"] <= entry["max"]
    # a sequential set_state with "each" commits once per operation (the end of the attempt
    # adds one), a ctx.do likewise; "boundary" shares commits between operations
    assert 1 <= metrics["ss_seq_set_state_each_commits"]["median"] < 1.2
    assert 1 <= metrics["ss_seq_do_commits"]["median"] < 1.2
    assert metrics["ss_seq_set_state_boundary_commits"]["median"] < 0.5
    for name in COMMIT_COUNTS:
        assert metrics[name]["min"] > 0, name
    # the floors: the raw 1-row rate over the commits per execution of the same run
    for floor, commits in (("floor_ss_e2e_seq", "ss_e2e_seq_commits"),
                           ("floor_ss_batch_seq", "ss_batch_seq_commits")):  # fmt: skip
        expected = metrics["raw_sqlite_1row"]["median"] / metrics[commits]["median"]
        assert metrics[floor]["median"] == pytest.approx(expected)
    for name in PEER_METRICS:  # measured, or reported with the reason it could not be
        entry = metrics[name]
        assert ("median" in entry and len(entry["runs"]) >= 3) or entry.get("error"), name
    assert {t["id"] for t in results["targets"]} == TARGETS
    for target in results["targets"]:
        statuses = {c["status"] for c in target["checks"]}
        assert target["status"] in ("met", "missed", "not measured")
        assert (target["status"] == "met") == (statuses == {"met"})
        for condition in target["checks"]:
            if condition["status"] != "not measured":
                assert isinstance(condition["value"], float)
        if target["status"] == "missed" and target["ours"] in results["profiles"]:
            assert target["profile"]
    assert results["durability"]["stepsource (SQLite)"]["synchronous"] == 2

    assert report.startswith("# stepsource benchmark report")
    assert "Quick mode" in report
    for title in WORKLOADS.values():
        assert f"### {title}" in report
    for section in ("## Machine", "## Durability", "## Targets", "## Library versions"):
        assert section in report
    for target_id in TARGETS:
        assert f"| {target_id} |" in report


def test_a_ratio_between_two_stepsource_metrics_is_measured_in_alternation() -> None:
    """o1 divides the observed batch handler by the plain one: their runs alternate
    (A B B A...), each run once per ``runs``, so a slow spell of the shared machine falls on
    both sides of the ratio; the other metrics keep their runs together. (Read in a child
    process from the repository's root, as ``make bench`` runs the workloads.)"""
    probe = (
        "import json; from bench.workloads.stepsource_sqlite import END_TO_END, PAIRED, "
        "run_order; print(json.dumps({'metrics': list(END_TO_END), 'paired': PAIRED, "
        "'orders': {runs: run_order(runs) for runs in (1, 2, 3)}}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    facts = json.loads(found.stdout)
    assert facts["paired"]
    for runs_text, order in facts["orders"].items():
        runs = int(runs_text)
        assert sorted(order) == sorted(facts["metrics"] * runs)
        for paired, base in facts["paired"].items():
            both = [m for m in order if m in (paired, base)]
            first = order.index(both[0])
            assert order[first : first + 2 * runs] == both  # adjacent, nothing between
            for i in range(runs):  # each pair holds one run of each, in ABBA order
                expected = [base, paired] if i % 2 == 0 else [paired, base]
                assert both[2 * i : 2 * i + 2] == expected
