"""Raw sqlite3: the ceiling of one SQLite file with the durability stepsource uses.

WAL and ``synchronous=FULL`` on a connection in autocommit mode, ``BEGIN IMMEDIATE`` ...
``COMMIT`` around each transaction, rows of stepsource's ``events`` table shape (stream id,
version, topic, a blob of the size of a stored event) under the same UNIQUE (stream, version)
index. No threads, no event loop: the loop is the measurement.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

from bench.common import ROW_BYTES, Recorder, Timer, main, remove_db

SCHEMA = """CREATE TABLE events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (stream_id, version))"""
TOPIC = "stepsource:StateSet"
DATA = b"x" * ROW_BYTES


def connect(path: Path) -> sqlite3.Connection:
    remove_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(SCHEMA)
    return conn


def settings(conn: sqlite3.Connection) -> dict[str, Any]:
    names = ("journal_mode", "synchronous")
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names}


def rows_per_commit(path: Path, commits: int, rows: int) -> tuple[float, dict[str, Any]]:
    """Transactions per second, each inserting ``rows`` rows."""
    conn = connect(path)
    stream = str(uuid.uuid4())
    version = 0
    try:
        with Timer() as timer:
            for _ in range(commits):
                batch = [(stream, version + i + 1, TOPIC, DATA) for i in range(rows)]
                version += rows
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)",
                    batch,
                )
                conn.execute("COMMIT")
        found = settings(conn)
    finally:
        conn.close()
        remove_db(path)
    return commits / timer.seconds, found


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    path = tmp / "raw.db"
    for _ in range(int(params["runs"])):
        tx, found = rows_per_commit(path, int(params["commits_1"]), 1)
        recorder.add("raw_sqlite_1row", tx, "tx/s", rows_per_commit=1)
        recorder.durability["raw sqlite3"] = found
    for _ in range(int(params["runs"])):
        tx, _ = rows_per_commit(path, int(params["commits_100"]), 100)
        recorder.add("raw_sqlite_100rows", tx * 100, "rows/s", rows_per_commit=100)


if __name__ == "__main__":
    main(measure)
