"""ExecutionMachine against every backend: 200 examples of 30 steps each, every rule fired."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from stepsource.adapters.ports import Backend
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.testing.machine import RULE_COUNTS, ExecutionMachine

RULES = {
    "start",
    "set_state",
    "update_state",
    "checkpoint",
    "restore",
    "add_history",
    "complete",
    "fail",
    "crash_and_reopen",
    "stale_append",
}
SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class SQLiteMachine(ExecutionMachine):
    def make_backend(self) -> Backend:
        self._folder = Path(tempfile.mkdtemp(prefix="machine-"))
        return SQLiteBackend(str(self._folder / "steps.db"), synchronous="normal")

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


def run(machine: type[ExecutionMachine]) -> None:
    RULE_COUNTS.clear()
    run_state_machine_as_test(machine, settings=SETTINGS)
    missing = RULES - {name for name, count in RULE_COUNTS.items() if count > 0}
    assert not missing, f"rules that never fired: {sorted(missing)}"


def test_execution_machine_on_memory() -> None:
    run(ExecutionMachine)


def test_execution_machine_on_sqlite() -> None:
    run(SQLiteMachine)
