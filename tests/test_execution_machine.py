"""ExecutionMachine against every backend (memory, SQLite, NATS, Redis): 200 examples of 30
steps each (100 on Redis), and every rule fired."""

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
from stepsource.testing.redis_server import RedisServer

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


def run(machine: type[ExecutionMachine], examples: int | None = None) -> None:
    RULE_COUNTS.clear()
    chosen = SETTINGS if examples is None else settings(SETTINGS, max_examples=examples)
    run_state_machine_as_test(machine, settings=chosen)
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


class RedisMachine(ExecutionMachine):
    """On a fresh key prefix of the session's redis-server."""

    server_url = ""

    def make_backend(self) -> Backend:
        return open_backend(f"{self.server_url}?prefix=M{uuid.uuid4().hex[:16]}&durability=off")


def test_execution_machine_on_redis(redis_server: RedisServer) -> None:
    RedisMachine.server_url = redis_server.url
    run(RedisMachine, examples=100)  # half: the fourth backend's share of the suite's time
