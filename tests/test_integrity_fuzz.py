"""Garbage written into a SQLite log while workers run takes no worker down.

Random rows land in the events table as the engine works: rows of new streams, rows whose
stream id is not a UUID, and rows at the next version of running executions (an unknown
topic, data that is not JSON, JSON missing its fields, a newer class version, an event with
a wrong checksum, a TEXT value). Afterwards every execution whose own events were left
untouched has completed with its normal output, and every damaged one is quarantined in the
index with the reason (as is each new stream of garbage with an execution id), while the
workers went on serving the rest.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from pathlib import Path

import anyio
import orjson
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio

EXECUTIONS = 16

_STAMP = '"timestamp":"2026-01-01T00:00:00+00:00"'


def _garbage(rng: random.Random) -> tuple[str, object]:
    """A topic and a stored value no release of stepsource wrote."""
    choice = rng.randrange(7)
    if choice == 0:
        return "stepsource:FromTheFuture", b"{" + _STAMP.encode() + b"}"
    if choice == 1:
        return "stepsource:StateSet", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if choice == 2:
        return "stepsource:StateSet", b"{" + _STAMP.encode() + b"}"  # its fields are missing
    if choice == 3:
        state = {"timestamp": "2026-01-01T00:00:00+00:00", "class_version": 99}
        return "stepsource:StepCancelled", orjson.dumps({**state, "reason": "r"})
    if choice == 4:
        return "stepsource:StepCancelled", b'{"_c":1,' + _STAMP.encode() + b',"reason":"r"}'
    if choice == 5:
        return "os:system", b"{}"  # never imported
    return "stepsource:StepCancelled", "{}"  # TEXT, not a BLOB


def _insert(path: str, stream_id: str, version: int, topic: str, data: object) -> bool:
    connection = sqlite3.connect(path, timeout=10)
    try:
        with connection:
            connection.execute(
                "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)",
                (stream_id, version, topic, data),
            )
        return True
    except sqlite3.IntegrityError:  # the worker took that version first
        return False
    finally:
        connection.close()


def _next_version(path: str, stream_id: str) -> int:
    connection = sqlite3.connect(path, timeout=10)
    try:
        (last,) = connection.execute(
            "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?", (stream_id,)
        ).fetchone()
    finally:
        connection.close()
    return int(last) + 1


def _tail(path: str, stream_id: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path, timeout=10)
    try:
        return connection.execute(
            "SELECT version, topic, substr(data, 1, 60) FROM events WHERE stream_id = ? "
            "ORDER BY version DESC LIMIT 3",
            (stream_id,),
        ).fetchall()
    finally:
        connection.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_garbage_rows_while_workers_run_quarantine_only_what_they_touch(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    path = str(tmp_path / "log.db")
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.02, lease_seconds=1.0, workers=8)

    @engine.step("fuzz.double")
    async def handler(ctx: ss.StepContext, n: int) -> int:
        for i in range(4):
            await ctx.set_state("i", i)
            await ctx.sleep(0.15)
        return n * 2

    damaged: set[str] = set()
    foreign: set[str] = set()
    async with engine:
        handles = [await engine.start("fuzz.double", {"n": n}) for n in range(EXECUTIONS)]
        ids = [h.execution_id for h in handles]
        for _ in range(24):
            await anyio.sleep(rng.uniform(0.0, 0.06))
            topic, data = _garbage(rng)
            kind = rng.randrange(3)
            if kind == 0:  # a stream of its own: listed as quarantined (its first event)
                stream = str(uuid.uuid4())
                foreign.add(stream)
                await anyio.to_thread.run_sync(_insert, path, stream, 1, topic, data)
            elif kind == 1:  # a stream id that is not an execution id
                stream = f"garbage-{rng.randrange(10**6)}"
                await anyio.to_thread.run_sync(_insert, path, stream, 1, topic, data)
            else:  # the next version of a running execution
                victim = rng.choice(ids)
                version = await anyio.to_thread.run_sync(_next_version, path, victim)
                if await anyio.to_thread.run_sync(_insert, path, victim, version, topic, data):
                    damaged.add(victim)
        untouched = [h for h in handles if h.execution_id not in damaged]
        assert damaged  # both kinds exist for these seeds
        assert untouched
        with anyio.fail_after(60):
            for n, handle in enumerate(handles):
                if handle in untouched:
                    assert await handle.result() == n * 2
        rows: list[ss.ExecutionSummary] = []
        with anyio.move_on_after(30):
            while {row.execution_id for row in rows} < damaged:
                await anyio.sleep(0.1)
                rows = await engine.executions(status="quarantined", limit=1000)
        missing = damaged - {row.execution_id for row in rows}
        listed = {row.execution_id: row for row in await engine.executions(limit=1000)}
        assert not missing, [(listed.get(eid), _tail(path, eid)) for eid in missing]
        for row in rows:
            assert row.execution_id in damaged | foreign
            assert row.last_error is not None
            first_bad = row.last_error["version"]
            assert isinstance(first_bad, int)
            assert first_bad >= 1
            assert row.last_error["message"]
        # the engine is still serving: a new execution runs to its end
        later = await engine.start("fuzz.double", {"n": 100})
        with anyio.fail_after(20):
            assert await later.result() == 200
    await engine.aclose()
