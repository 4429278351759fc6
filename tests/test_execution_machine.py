"""ExecutionMachine against every backend (memory, SQLite, NATS): 200 examples of 30 steps
each, and every rule fired."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from stepsource.adapters.ports import Backend
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.urls import open_backend
from stepsource.testing.machine import RULE_COUNTS, ExecutionMachine
from stepsource.testing.nats_server import NatsServer

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


class NatsMachine(ExecutionMachine):
    """On a fresh stream (its own subject prefix) of the session's nats-server."""

    server_url = ""

    def make_backend(self) -> Backend:
        return open_backend(f"{self.server_url}?stream=M{uuid.uuid4().hex[:16]}")


def test_execution_machine_on_nats(nats_server: NatsServer) -> None:
    NatsMachine.server_url = nats_server.url
    run(NatsMachine)
