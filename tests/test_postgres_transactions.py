"""Transactional steps (``ctx.transaction``) on a real PostgreSQL server: the user's rows and
the step's record commit in one transaction, so a row is written exactly once whatever the
crash point (a worker killed before the commit leaves neither, one killed after it leaves
both and the body never runs again), a failing body leaves no row, a replay returns the
recorded result, and the other backends refuse it with a clear error.

The body inserts a row into a user table and returns the row count it saw: the count of rows
at the end is the proof (one row per execution, never zero, never two).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

import stepsource as ss
from stepsource.engine.readmodels import ReadModels
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(120)
DEADLINE = 30.0

STEPS = """
import sys, anyio, stepsource as ss

RUNS = []  # the bodies run in this process

def make(url, workers=1, lease=30.0):
    engine = ss.Engine(url, workers=workers, poll_interval=0.02, lease_seconds=lease)
    table = url.rpartition("schema=")[2] + "_user.orders"

    @engine.step("tx.order")
    async def order(ctx: ss.StepContext, n: int, fail: bool = False) -> int:
        async def insert(conn):
            RUNS.append(n)
            await conn.execute(f"INSERT INTO {table} (n) VALUES (%s)", (n,))
            if fail:
                raise ValueError(f"no stock for {n}")
            cursor = await conn.execute(f"SELECT count(*) FROM {table} WHERE n = %s", (n,))
            return (await cursor.fetchone())[0]

        try:
            seen = await ctx.transaction("insert", insert)
        except ss.SubStepFailedError as error:
            return -1 if error.error_type == "ValueError" else -2
        await ctx.set_state("seen", seen)
        await ctx.sleep(0.2)  # a suspension: the resumed run replays the transaction
        return seen

    return engine
"""
WORKER = """
import anyio
from steps import make

async def main(url: str) -> None:
    engine = make(url, workers=1, lease=1.0)
    async with engine:
        print("worker ready", flush=True)
        await anyio.sleep_forever()

import sys
anyio.run(main, sys.argv[1])
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "steps.py").write_text(STEPS)
    (tmp_path / "worker.py").write_text(WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("steps", None)
    yield importlib.import_module("steps")  # the module the worker processes import too
    sys.modules.pop("steps", None)


def new_store(server: PostgresServer) -> tuple[str, str]:
    """A fresh schema for the engine and a user table beside it: (url, user table)."""
    schema = f"t{uuid.uuid4().hex[:16]}"
    table = f"{schema}_user.orders"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}_user")
        conn.execute(f"CREATE TABLE {table} (id SERIAL PRIMARY KEY, n INT NOT NULL)")
    return server.url(schema=schema), table


def rows(server: PostgresServer, table: str) -> list[int]:
    with psycopg.connect(server.url()) as conn:
        return [r[0] for r in conn.execute(f"SELECT n FROM {table} ORDER BY id").fetchall()]


@pytest.mark.anyio
async def test_rows_and_result_commit_together_and_a_replay_does_not_run_the_body(
    postgres_server: PostgresServer, steps: Any
) -> None:
    url, table = new_store(postgres_server)
    steps.RUNS.clear()
    engine = steps.make(url, workers=2)
    async with engine:
        handles = [await engine.start("tx.order", {"n": n}) for n in range(3)]
        results = [await h.result(timeout=DEADLINE) for h in handles]
        assert results == [1, 1, 1]
        # each resumed after its sleep by replaying its record: every body ran once
        assert sorted(steps.RUNS) == [0, 1, 2]
        events = await engine.store.events(handles[0].execution_id)
    assert sorted(rows(postgres_server, table)) == [0, 1, 2]
    done = [e for e in events if type(e).__name__ == "SubStepCompleted"]
    assert [(e.name, e.value) for e in done] == [("insert", 1)]
    await engine.aclose()


@pytest.mark.anyio
async def test_a_failing_body_leaves_no_row_and_its_failure_is_recorded(
    postgres_server: PostgresServer, steps: Any
) -> None:
    url, table = new_store(postgres_server)
    engine = steps.make(url)
    async with engine:
        handle = await engine.start("tx.order", {"n": 7, "fail": True})
        assert await handle.result(timeout=DEADLINE) == -1
        events = await engine.store.events(handle.execution_id)
    assert rows(postgres_server, table) == []  # its insert was rolled back
    failed = [e for e in events if type(e).__name__ == "SubStepFailed"]
    assert len(failed) == 1
    await engine.aclose()


@pytest.mark.anyio
async def test_a_transactional_steps_record_reaches_the_index_from_the_log_only(
    postgres_server: PostgresServer, steps: Any
) -> None:
    """A worker's index takes its own commits from the index feed (engine/index_feed.py)
    by the positions the append gave them. Inside a transactional step the append gives
    positions before the transaction commits, and a rolled-back one leaves them to the next
    commit: so those commits are never told to the feed, and the index reads them from the
    log once they are committed."""
    url, _ = new_store(postgres_server)
    engine = steps.make(url, workers=2)
    told: list[list[str]] = []
    async with engine:
        listener = engine.store.appended
        assert listener is not None

        def spy(stream_id: str, last: int, events: Any) -> None:
            told.append([type(e).__name__ for e in events])
            listener(stream_id, last, events)

        engine.store.appended = spy
        handles = [await engine.start("tx.order", {"n": n, "fail": n == 2}) for n in range(3)]
        assert [await h.result(timeout=DEADLINE) for h in handles] == [1, 1, -1]
        rows_now = await engine.executions(limit=10)
        assert sorted(r.status for r in rows_now) == ["completed"] * 3
    records = [type(e).__name__ for h in handles for e in await engine.store.events(h.execution_id)]
    assert records.count("SubStepCompleted") == 2
    assert records.count("SubStepFailed") == 1
    assert told  # the other commits were told
    assert not [t for t in told if "SubStepCompleted" in t or "SubStepFailed" in t]
    fresh = ReadModels(engine.store, None, batch_size=3)
    await fresh.catch_up()
    assert await engine._readmodels.dump() == await fresh.dump()
    await engine.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("url_kind", ["memory", "sqlite"])
async def test_other_backends_refuse_a_transactional_step(
    url_kind: str, tmp_path: Path, steps: Any
) -> None:
    url = "memory://" if url_kind == "memory" else f"sqlite:///{tmp_path / 'x.db'}"
    engine = ss.Engine(url, workers=1, poll_interval=0.02)

    @engine.step("tx.refused", max_retries=0)
    async def refused(ctx: ss.StepContext) -> int:
        async def body(conn: Any) -> int:
            raise AssertionError("never runs")

        return await ctx.transaction("insert", body)

    async with engine:
        handle = await engine.start("tx.refused")
        with pytest.raises(ss.StepFailedError, match=r"ctx.transaction\('insert'\)") as info:
            await handle.result(timeout=DEADLINE)
    assert "postgresql://" in str(info.value)
    await engine.aclose()


def _kill_worker_at(tmp_path: Path, url: str, point: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "STEPSOURCE_TEST_KILL_AT"}
    env["STEPSOURCE_TEST_KILL_AT"] = point
    done = subprocess.run(
        [sys.executable, "worker.py", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=DEADLINE,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


@pytest.mark.parametrize(
    ("point", "committed"),
    [
        ("after-substep-body", False),  # the body ran, nothing appended yet
        ("after-record", False),  # the record appended in the transaction, not committed
        ("after-transaction", True),  # rows and record committed
    ],
)
def test_a_worker_killed_around_the_commit_leaves_exactly_one_row(
    postgres_server: PostgresServer, tmp_path: Path, steps: Any, point: str, committed: bool
) -> None:
    url, table = new_store(postgres_server)

    async def start() -> str:
        client = steps.make(url, workers=0)
        handle = await client.start("tx.order", {"n": 5})
        await client.aclose()
        return str(handle.execution_id)

    execution_id = anyio.run(start)
    _kill_worker_at(tmp_path, url, point)
    assert rows(postgres_server, table) == ([5] if committed else [])

    async def resume() -> tuple[int, list[int]]:
        steps.RUNS.clear()
        engine = steps.make(url, workers=1, lease=1.0)
        async with engine:  # takes the execution over once the dead worker's lease lapses
            result = await engine.get_handle(execution_id).result(timeout=DEADLINE)
        await engine.aclose()
        return int(result), list(steps.RUNS)

    result, runs = anyio.run(resume)
    assert rows(postgres_server, table) == [5]  # exactly once
    assert result == 1
    assert runs == ([] if committed else [5])  # a committed body never runs again
