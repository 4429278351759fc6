"""``Backend.queue_depth``: the runnable executions waiting for a worker (what the
``stepsource_queue_depth`` metric samples), on the backends that count it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from stepsource.adapters.contract_support import enqueue, make_commit
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """On trio, PostgreSQL is not generated (tests/conftest.py: its driver is asyncio-only)."""
    if request.param == "memory":
        return MemoryBackend()
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return PostgresBackend.from_url(server.url(schema=f"t{uuid.uuid4().hex[:16]}"))
    return SQLiteBackend(str(tmp_path / "steps.db"))


async def test_queue_depth_counts_what_a_worker_could_lease_now(backend: Backend) -> None:
    for stream in ("a", "b", "c"):
        await backend.append(make_commit(stream, 0, queue=enqueue("step", due_ms=100)))
    await backend.append(make_commit("later", 0, queue=enqueue("step", due_ms=10_000)))
    await backend.append(make_commit("other", 0, queue=enqueue("other", due_ms=100)))
    assert await backend.queue_depth(["step"], now_ms=50) == 0  # none due yet
    assert await backend.queue_depth(["step"], now_ms=200) == 3
    assert await backend.queue_depth(["step", "other"], now_ms=200) == 4
    [lease] = await backend.lease("w", ["step"], now_ms=200, lease_ms=1000, limit=1)
    assert await backend.queue_depth(["step"], now_ms=300) == 2  # one is leased
    assert await backend.queue_depth(["step"], now_ms=1201 + 200) == 3  # its lease expired
    assert await backend.queue_depth(["step"], now_ms=20_000) == 4
    assert lease.stream_id in ("a", "b", "c")
    await backend.aclose()
