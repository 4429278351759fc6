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
    "d": "(d) replay",
    "e": "(e) projection rebuild",
    "f": "(f) suspended executions",
    "g": "(g) NATS JetStream",
    "h": "(h) Redis",
}
TARGETS = {"a1", "a2", "b1", "b2", "c1", "c2", "c3", "c4", "d1", "d2", "e", "f", "g", "h1", "h2"}
STEPSOURCE_METRICS = {
    "ss_seq_set_state",
    "ss_concurrent_appends",
    "ss_e2e_seq",
    "ss_e2e_conc50",
    "ss_replay_full_1000",
    "ss_replay_snapshot_1000",
    "ss_rebuild",
    "ss_suspended_rss_1000",
    "ss_nats_seq_set_state",
    "ss_nats_concurrent_appends",
    "ss_redis_seq_do",
    "ss_redis_concurrent_appends",
}
PEER_METRICS = {
    "raw_sqlite_1row",
    "raw_sqlite_100rows",
    "es_saves",
    "es_replay_1000",
    "dbos_steps_seq",
    "dbos_wf_seq",
    "dbos_wf_conc50",
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
        assert len(entry["runs"]) >= 3
        assert entry["min"] <= entry["median"] <= entry["max"]
    for name in PEER_METRICS:  # measured, or reported with the reason it could not be
        entry = metrics[name]
        assert ("median" in entry and len(entry["runs"]) >= 3) or entry.get("error"), name
    assert {t["id"] for t in results["targets"]} == TARGETS
    for target in results["targets"]:
        assert target["status"] in ("met", "missed", "not measured")
        if target["status"] != "not measured":
            assert isinstance(target["value"], float)
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
