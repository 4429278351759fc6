"""The PostgreSQL backend under the engine: wake-ups between processes over LISTEN/NOTIFY
(a worker learns of work another engine queued without waiting for its next poll), and the
command line reading a PostgreSQL log."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import psycopg
import pytest

import stepsource as ss
from stepsource.adapters.contract import enqueue, make_commit, suspend
from stepsource.adapters.ports import QueueUpdate
from stepsource.adapters.postgres.append_function import APPEND_FUNCTION, PREVIOUS_FUNCTION
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.adapters.postgres.commits import _arguments, _call
from stepsource.testing.nats_server import free_port
from stepsource.testing.postgres_server import PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

#: far beyond the tests' deadlines: only a pushed wake-up can make them pass
_NEVER = 300.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_watch_wakes_on_another_connections_commits_and_posts(
    postgres_server: PostgresServer,
) -> None:
    """Workers are woken by new work (a queued execution, an inbox post); observers by that
    and by a start leased by its own worker or an end, which leave nothing to lease."""
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    listener, writer = PostgresBackend.from_url(url), PostgresBackend.from_url(url)
    other = PostgresBackend.from_url(postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}"))
    seen: list[str] = []  # "work" (on_work) and "change" (on_change) in the order called
    noticed = anyio.Event()

    def note(kind: str) -> None:
        nonlocal noticed
        seen.append(kind)
        noticed.set()

    async def next_notice() -> list[str]:
        """What the next notice called (on_work is followed by on_change)."""
        nonlocal noticed
        with anyio.fail_after(10):
            await noticed.wait()
        await anyio.sleep(0.05)
        noticed = anyio.Event()
        told = list(seen)
        seen.clear()
        return told

    work, change = ["work", "change"], ["change"]
    async with anyio.create_task_group() as group:
        group.start_soon(listener.watch, lambda: note("work"), lambda _id: note("change"))
        assert await next_notice() == work  # every (re)connect gives one: it listens now
        await writer.append(make_commit("s", 0, queue=enqueue("step")))
        assert await next_notice() == work
        await writer.post("s", "signal", "go", b"", 0)
        assert await next_notice() == work
        await other.post("s", "signal", "go", b"", 0)  # another schema: not ours
        await writer.append(make_commit("s", 1))  # progress without a queue change: silent
        await writer.append(make_commit("s", 2, queue=enqueue("step")))
        assert await next_notice() == work
        [lease] = await writer.lease("w1", ["step"], 0, 60_000, 1)
        await writer.append(make_commit("s", 3, lease_owner="w1", queue=QueueUpdate("done")))
        assert await next_notice() == change  # an end: nothing new to lease
        started = QueueUpdate("lease", step_id="step", owner="w1", lease_expires_ms=60_000)
        await writer.append(make_commit("t", 0, queue=started))
        assert await next_notice() == change  # a start its own worker leased
        await writer.append(make_commit("t", 1, lease_owner="w1", queue=suspend("step", 0, 0)))
        assert await next_notice() == work  # back in the queue
        assert lease.stream_id == "s"
        # a process of the previous release appends through its function, kept in a schema
        # this release made: its end wakes every listener, as that release's did
        [lease] = await writer.lease("w1", ["step"], 0, 60_000, 1)
        end = make_commit("t", 2, lease_owner="w1", queue=QueueUpdate("done"))
        arguments = _arguments([end])
        call = _call(writer.pool.schema, tuple(0 if a is None else 1 for a in arguments))
        previous = call.replace(APPEND_FUNCTION.encode(), PREVIOUS_FUNCTION.encode())
        async with await psycopg.AsyncConnection.connect(
            postgres_server.url(), autocommit=True
        ) as conn:
            cursor = await conn.execute(previous, [a[0] for a in arguments if a is not None])
            assert await cursor.fetchone() == (0, 7, None)  # accepted: the 7th event
        assert await next_notice() == work
        group.cancel_scope.cancel()
    for backend in (listener, writer, other):
        await backend.aclose()


async def test_a_worker_engine_is_woken_by_another_engines_start(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    worker = ss.Engine(url, workers=2, poll_interval=_NEVER)
    client = ss.Engine(url, workers=0, poll_interval=_NEVER)

    @worker.step("wake.double")
    async def double(ctx: ss.StepContext, n: int) -> int:
        return 2 * n

    client.step("wake.double")(double)  # the client validates input locally
    async with worker, client:
        await anyio.sleep(0.2)  # the worker leased once and found nothing: it sleeps
        handles = [await client.start("wake.double", {"n": n}) for n in range(3)]
        with anyio.fail_after(30):
            assert [await handle.result() for handle in handles] == [0, 2, 4]


async def test_the_command_line_reads_a_postgres_log(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """`stepsource ls/show` in another process read what an engine wrote; an unreachable
    server is exit code 3, its message without the password."""
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    engine = ss.Engine(url, workers=1, poll_interval=0.05)

    @engine.step("cli.greet")
    async def greet(ctx: ss.StepContext, name: str) -> str:
        await ctx.set_state("greeted", name)
        return f"hello {name}"

    async with engine:
        handle = await engine.start("cli.greet", {"name": "pg"})
        assert await handle.result(timeout=30) == "hello pg"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "stepsource", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)

    listed = await anyio.to_thread.run_sync(cli, "ls", "--url", url, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["execution_id"], row["status"]) for row in rows] == [
        (handle.execution_id, "completed")
    ]
    shown = await anyio.to_thread.run_sync(cli, "show", handle.execution_id, "--url", url)
    assert shown.returncode == 0, shown.stderr
    assert "greeted" in shown.stdout
    port = free_port()
    away = await anyio.to_thread.run_sync(
        cli, "ls", "--url", f"postgresql://app:hunter2@127.0.0.1:{port}/x"
    )
    assert away.returncode == 3
    assert "hunter2" not in away.stderr
    assert f"127.0.0.1:{port}" in away.stderr
