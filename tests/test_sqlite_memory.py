"""A worker's SQLite memory stays small whatever the size of its batches.

A statement with one placeholder per execution (``IN (?, ?, ...)``, ``VALUES (?), (?)...``)
is a different statement for every batch size, and Python's sqlite3 keeps up to 128 prepared
statements per connection: a worker that had folded index batches and grouped commits of many
sizes held about 7 MB of them for good (table (f) of the benchmark report). The index and the
group commit look their executions up with one statement taking a JSON array instead.

The memory is read with ``sqlite3_memory_used()`` from the SQLite library Python's sqlite3
module is linked with (checked to be the same instance first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio

from stepsource.adapters.ports import Commit, NewEvent
from stepsource.adapters.sqlite.backend import SQLiteBackend
from stepsource.adapters.sqlite.commits import apply_commits
from stepsource.engine.index_file import ExecutionsIndex
from stepsource.projections.summaries import Touched

#: batch sizes that each made a statement of their own: more than the cache holds
SIZES = range(250, 250 - 130, -1)


def _library() -> ctypes.CDLL:
    """The SQLite library of Python's sqlite3 module (the same instance, not another copy)."""
    name = ctypes.util.find_library("sqlite3")
    assert name is not None, "the SQLite shared library is not found"
    library = ctypes.CDLL(name)
    library.sqlite3_memory_used.restype = ctypes.c_int64
    before = library.sqlite3_memory_used()
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.execute("INSERT INTO t VALUES (zeroblob(4000000))")
    grown = library.sqlite3_memory_used() - before
    conn.close()
    assert grown > 2_000_000, "ctypes reached another SQLite than the sqlite3 module's"
    return library


def _used(library: ctypes.CDLL) -> int:
    return int(library.sqlite3_memory_used())


def test_index_batches_of_every_size_hold_no_statement_per_size(tmp_path: Path) -> None:
    library = _library()
    index = ExecutionsIndex(str(tmp_path / "index.db"))
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    position = 0
    assert index.apply(0, [], None)
    start = _used(library)
    for size in SIZES:
        batch: list[tuple[int, Touched]] = []
        for _ in range(size):
            position += 1
            batch.append((position, Touched(str(uuid.uuid4()), 2, moment)))
        assert index.apply(position - size, batch, None)
    grown = _used(library) - start
    index.close()
    # one statement per size came to ~9 MB here; the JSON-array lookup stays flat
    assert grown < 1_500_000, f"SQLite holds {grown:,} more bytes after 130 batch sizes"


def test_group_commits_of_every_size_hold_no_statement_per_size(tmp_path: Path) -> None:
    library = _library()
    path = tmp_path / "log.db"

    async def create() -> None:  # the backend's first open makes the schema
        backend = SQLiteBackend(str(path))
        await backend.open()
        await backend.aclose()

    anyio.run(create)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA cache_size = -256")  # as the backend's own connections
    start = _used(library)
    for size in SIZES:
        commits = []
        for _ in range(size):
            stream = str(uuid.uuid4())
            event = NewEvent(stream, 1, "stepsource:test", b"{}")
            commits.append(Commit(stream_id=stream, expected_version=0, events=[event]))
        conn.execute("BEGIN IMMEDIATE")
        outcomes = apply_commits(conn, commits)
        conn.execute("COMMIT")
        assert all(isinstance(outcome, int) for outcome in outcomes)
    grown = _used(library) - start
    (stored,) = conn.execute("SELECT count(*) FROM events").fetchone()
    conn.close()
    assert stored == sum(SIZES)
    assert grown < 1_500_000, f"SQLite holds {grown:,} more bytes after 130 commit-set sizes"
