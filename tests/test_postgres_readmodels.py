"""Read models in the PostgreSQL database: one executions index that every process queries,
folded exactly once (its tracking position moves in the transaction that writes the rows),
rebuilt in place, and intact across a SIGKILL of the process folding it mid-batch.

The rows are compared with a local SQLite fold of the same log (the index the other backends
keep), so the table is checked against an independent implementation, not itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import orjson
import psycopg
import pytest

import stepsource as ss
from stepsource.engine.index_file import ExecutionsIndex
from stepsource.engine.readmodels import ReadModels
from stepsource.projections.executions_index import COLUMNS
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(120)
DEADLINE = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only


def make_engine(url: str, workers: int = 2) -> ss.Engine:
    engine = ss.Engine(url, workers=workers, poll_interval=0.02)

    @engine.step("rm.ok")
    async def ok(ctx: ss.StepContext, n: int) -> int:
        if n % 3 == 2:
            raise ValueError(f"bad {n}")
        return n

    return engine


def table_state(url: str, schema: str) -> tuple[int, list[tuple[Any, ...]]]:
    """The tracking position and the rows, read with plain SQL (what any process sees)."""
    conninfo = url.split("?")[0]
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            f"SELECT position FROM {schema}.readmodels WHERE name = 'executions'"
        ).fetchone()
        rows = conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM {schema}.executions ORDER BY position"
        ).fetchall()
    return (0 if row is None else int(row[0])), [tuple(r) for r in rows]


async def local_fold(url: str, upto: int | None = None) -> list[tuple[Any, ...]]:
    """The index of the same log folded into a local in-memory SQLite index."""
    engine = ss.Engine(url, workers=0)
    models = ReadModels(engine.store, None, batch_size=7)
    models.index = ExecutionsIndex(None)
    await models.catch_up(upto)
    rows = await anyio.to_thread.run_sync(models.index.dump)
    await engine.aclose()
    return rows


async def run_some(url: str, count: int) -> int:
    engine = make_engine(url, workers=2)
    async with engine:
        handles = [await engine.start("rm.ok", {"n": n}) for n in range(count)]
        for handle in handles:
            with contextlib.suppress(ss.StepFailedError):  # every third fails: an error row
                await handle.result(timeout=DEADLINE)
    end = await engine.store.backend.max_position()
    await engine.aclose()
    return end


QUERY = """
import sys, anyio, orjson, stepsource as ss

async def main() -> None:
    engine = ss.Engine(sys.argv[1], workers=0)
    folded = await engine._readmodels.catch_up()
    rows = await engine.executions(limit=1000)
    print(orjson.dumps({"folded": folded, "rows": [[r.execution_id, r.status] for r in rows]})
          .decode(), flush=True)
    await engine.aclose()

anyio.run(main)
"""


@pytest.mark.anyio
async def test_two_processes_query_the_same_index_in_the_database(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    schema = f"t{uuid.uuid4().hex[:16]}"
    url = postgres_server.url(schema=schema)
    end = await run_some(url, 6)
    engine = make_engine(url, workers=0)
    mine = [(r.execution_id, r.status) for r in await engine.executions(limit=1000)]
    await engine.aclose()
    assert sorted(status for _, status in mine) == ["completed"] * 4 + ["failed"] * 2
    assert table_state(url, schema)[0] == end  # folded once, by this process

    # another process reads the same rows and folds nothing: they are already there
    with anyio.fail_after(DEADLINE):
        done = await anyio.run_process(
            [sys.executable, "-c", QUERY, url], cwd=tmp_path, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    theirs = orjson.loads(done.stdout)
    assert theirs["folded"] == 0
    assert [tuple(r) for r in theirs["rows"]] == mine
    assert list(tmp_path.iterdir()) == []  # no local read-model file anywhere
    position, rows = table_state(url, schema)
    assert (position, rows) == (end, await local_fold(url))


@pytest.mark.anyio
async def test_a_rebuild_in_the_database_gives_the_rows_of_a_local_fold(
    postgres_server: PostgresServer,
) -> None:
    schema = f"t{uuid.uuid4().hex[:16]}"
    url = postgres_server.url(schema=schema)
    end = await run_some(url, 5)
    engine = make_engine(url, workers=0)
    assert len(await engine.executions()) == 5
    conninfo = url.split("?")[0]
    with psycopg.connect(conninfo) as conn:  # damage the rows: a rebuild folds them again
        conn.execute(f"UPDATE {schema}.executions SET status = 'cancelled'")
    report = await engine.rebuild_projections()
    assert (report.position, report.executions) == (end, 5)
    assert table_state(url, schema) == (end, await local_fold(url))
    await engine.aclose()


RUNNER = """
import sys, anyio, stepsource as ss

async def main() -> None:
    engine = ss.Engine(sys.argv[1], workers=0)
    engine._readmodels.batch_size = int(sys.argv[2])
    await engine._readmodels.catch_up()
    print("caught up", flush=True)
    await engine.aclose()

anyio.run(main)
"""


def test_a_folder_killed_mid_batch_leaves_the_position_and_rows_of_whole_batches(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    schema = f"t{uuid.uuid4().hex[:16]}"
    url = postgres_server.url(schema=schema)
    batch = 8
    end = anyio.run(run_some, url, 8)
    conninfo = url.split("?")[0]
    with psycopg.connect(conninfo) as conn:  # forget what the populating engine folded
        conn.execute(f"DELETE FROM {schema}.executions")
        conn.execute(f"UPDATE {schema}.readmodels SET position = 0, origin = NULL")
    assert end > 3 * batch

    def fold_in_process(kill_at: str | None) -> subprocess.CompletedProcess[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "STEPSOURCE_TEST_KILL_AT"}
        if kill_at:
            env["STEPSOURCE_TEST_KILL_AT"] = kill_at
        return subprocess.run(
            [sys.executable, "-c", RUNNER, url, str(batch)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=DEADLINE,
        )

    # killed inside the third batch's transaction, after its rows and position were written
    killed = fold_in_process("readmodel-batch:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    position, rows = table_state(url, schema)
    assert position == 2 * batch  # nothing of the third batch survived
    assert rows == anyio.run(local_fold, url, 2 * batch)

    # a restarted folder goes on from there: every event folded exactly once
    again = fold_in_process(None)
    assert again.returncode == 0, again.stderr.decode()
    position, rows = table_state(url, schema)
    assert position == end
    assert rows == anyio.run(local_fold, url)
    assert all(r[COLUMNS.index("events")] == r[COLUMNS.index("version")] for r in rows)
