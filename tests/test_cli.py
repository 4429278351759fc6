"""The real `stepsource` entry point in a subprocess: demo, queries, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def stepsource(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepsource", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_on_the_embedded_default_and_shows_what_it_recorded(tmp_path: Path) -> None:
    run = stepsource("demo", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "processedCount=23 failedCount=2" in run.stdout
    assert "restored" in run.stdout
    assert "time travel" in run.stdout
    assert (tmp_path / "stepsource.db").exists()  # ./stepsource.db, no URL given

    listed = stepsource("ls", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["status"] for row in rows] == ["completed"]
    execution_id = rows[0]["execution_id"]

    shown = stepsource("show", execution_id, "--at", "6", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == {"progress": 0, "status": "initializing"}
    events = stepsource(
        "--url", "sqlite:///stepsource.db", "events", execution_id, "--json", cwd=tmp_path
    )
    assert json.loads(events.stdout)[0]["type"] == "StepScheduled"


def test_exit_codes_for_user_errors_and_unreachable_backends(tmp_path: Path) -> None:
    # a read-only command on a missing database file refuses instead of creating it (an
    # unknown id in an existing log is exit 2: tests/test_cli_commands.py)
    unknown = stepsource("show", "00000000-0000-4000-8000-000000000000", cwd=tmp_path)
    assert unknown.returncode == 3
    assert "there is no such file" in unknown.stderr
    assert not (tmp_path / "stepsource.db").exists()
    bad_url = stepsource("ls", "--url", "mysql://127.0.0.1/x", cwd=tmp_path)
    assert bad_url.returncode == 2
    assert "sqlite:///" in bad_url.stderr  # the message shows the accepted forms
    missing_dir = stepsource("ls", "--url", f"sqlite:///{tmp_path}/no/such/dir/x.db", cwd=tmp_path)
    assert missing_dir.returncode == 3
    assert "cannot" in missing_dir.stderr.lower() or "unable" in missing_dir.stderr.lower()
