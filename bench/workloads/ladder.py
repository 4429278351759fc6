"""Where the time of one sequential append goes: a ladder from raw sqlite3 to stepsource.

Each rung adds one layer to the same durable 1-event transaction (WAL, ``synchronous=FULL``,
a 300-byte row into stepsource's own schema), measured in the same process one after
another, so the difference between two rungs is what that layer costs:

1. ``ladder_statements``: what stepsource's SQLite adapter runs for one commit, called
   directly in a loop: ``BEGIN IMMEDIATE``, the adapter's own
   :func:`~stepsource.adapters.sqlite.commits.apply_commits` (today one statement reading the
   stream's version and lease holder, and the insert) and ``COMMIT``, with no thread, event
   loop or group-commit bookkeeping. (It used to spell out the statements an earlier adapter
   ran, a savepoint and two more among them: a rung that followed the adapter no longer.)
2. ``ladder_anyio_thread``: a plain 1-row transaction run through ``anyio.to_thread.run_sync``
   from an event loop (the thread hop the adapter makes per commit).
3. ``ladder_dedicated_thread``: the same transaction handed to one long-lived writer thread
   through a queue, its result posted back with ``call_soon_threadsafe`` (what a dedicated
   writer would cost instead of the hop).
4. ``ladder_backend_append``: ``SQLiteBackend.append`` of a 1-event commit (the adapter with
   its group-commit bookkeeping, no engine).

The engine's own rung is ``ss_seq_set_state`` (workload (a)); the floor is
``raw_sqlite_1row``.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from bench.common import ROW_BYTES, Recorder, main, remove_db
from stepsource.adapters.ports import Commit, NewEvent
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.sqlite.commits import apply_commits
from stepsource.adapters.sqlite.schema import SCHEMA

DATA = b"x" * ROW_BYTES
TOPIC = "stepsource:StateSet"


def connect(path: Path) -> sqlite3.Connection:
    remove_db(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for statement in SCHEMA:
        conn.execute(statement)
    return conn


def plain_tx(conn: sqlite3.Connection, stream: str, version: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)",
        (stream, version, TOPIC, DATA),
    )
    conn.execute("COMMIT")


def adapter_statements_tx(conn: sqlite3.Connection, stream: str, version: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    commit = Commit(
        stream_id=stream,
        expected_version=version - 1,
        events=[NewEvent(stream, version, TOPIC, DATA)],
    )
    (outcome,) = apply_commits(conn, [commit])
    if not isinstance(outcome, int):
        raise outcome
    conn.execute("COMMIT")


def statements(path: Path, n: int) -> float:
    conn = connect(path)
    stream = str(uuid.uuid4())
    try:
        started = time.perf_counter()
        for version in range(1, n + 1):
            adapter_statements_tx(conn, stream, version)
        return n / (time.perf_counter() - started)
    finally:
        conn.close()


async def anyio_thread(path: Path, n: int) -> float:
    conn = connect(path)
    stream = str(uuid.uuid4())
    try:
        started = time.perf_counter()
        for version in range(1, n + 1):
            await anyio.to_thread.run_sync(plain_tx, conn, stream, version)
        return n / (time.perf_counter() - started)
    finally:
        conn.close()


async def dedicated_thread(path: Path, n: int) -> float:
    conn = connect(path)
    stream = str(uuid.uuid4())
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None] = (
        queue.SimpleQueue()
    )

    def writer() -> None:
        while (job := jobs.get()) is not None:
            body, future = job
            body()
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        for version in range(1, n + 1):
            future: asyncio.Future[None] = loop.create_future()
            jobs.put((lambda v=version: plain_tx(conn, stream, v), future))
            await future
        return n / (time.perf_counter() - started)
    finally:
        jobs.put(None)
        thread.join()
        conn.close()


async def backend_append(path: Path, n: int) -> float:
    remove_db(path)
    backend = SQLiteBackend(str(path))
    await backend.open()
    stream = str(uuid.uuid4())
    try:
        started = time.perf_counter()
        for version in range(1, n + 1):
            await backend.append(
                Commit(
                    stream_id=stream,
                    expected_version=version - 1,
                    events=[NewEvent(stream, version, TOPIC, DATA)],
                )
            )
        return n / (time.perf_counter() - started)
    finally:
        await backend.aclose()


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    path, n = tmp / "ladder.db", int(params["n"])
    for _ in range(int(params["runs"])):  # the rungs interleaved, run after run
        recorder.add("ladder_statements", statements(path, n), "tx/s", n=n)
        rate = asyncio.run(anyio_thread(path, n))
        recorder.add("ladder_anyio_thread", rate, "tx/s", n=n)
        rate = asyncio.run(dedicated_thread(path, n))
        recorder.add("ladder_dedicated_thread", rate, "tx/s", n=n)
        rate = anyio.run(backend_append, path, n, backend="asyncio")
        recorder.add("ladder_backend_append", rate, "appends/s", n=n)
    remove_db(path)


if __name__ == "__main__":
    main(measure)
