"""A damaged log is detected and reported (execution, version, what to do), never served as
a shorter or different history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


async def populated(tmp_path: Path) -> tuple[str, str, ss.Engine]:
    path = str(tmp_path / "log.db")
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.01)

    @engine.step("corrupt.me")
    async def handler(ctx: ss.StepContext) -> int:
        for i in range(8):
            await ctx.set_state("i", i)
        return 8

    async with engine:
        handle = await engine.start("corrupt.me")
        await handle.result(timeout=10)
    await engine.aclose()
    return path, handle.execution_id, engine


def tamper(path: str, sql: str, *args: object) -> None:
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(sql, args)
    connection.close()


async def test_missing_events_are_reported_not_skipped(tmp_path: Path) -> None:
    path, eid, engine = await populated(tmp_path)
    tamper(path, "DELETE FROM events WHERE stream_id = ? AND version = 5", eid)
    for query in (engine.state_of, engine.history_of, engine.describe):
        with pytest.raises(ss.CorruptLogError) as caught:
            await query(eid)
        assert eid in str(caught.value)
        assert "missing" in str(caught.value) or "gap" in str(caught.value)


async def test_a_damaged_event_names_its_stream_and_version(tmp_path: Path) -> None:
    path, eid, engine = await populated(tmp_path)
    tamper(path, "UPDATE events SET data = x'00ff10' WHERE stream_id = ? AND version = 6", eid)
    with pytest.raises(ss.CorruptLogError) as caught:
        await engine.state_of(eid)
    message = str(caught.value)
    assert eid in message
    assert "event 6" in message
    assert await engine.events(eid, to_version=5)  # what precedes it is still readable


async def test_an_event_from_a_newer_version_is_refused_with_advice(tmp_path: Path) -> None:
    path, eid, engine = await populated(tmp_path)
    tamper(
        path,
        "UPDATE events SET topic = 'stepsource:FutureEvent' WHERE stream_id = ? AND version = 4",
        eid,
    )
    with pytest.raises(ss.UnknownEventError, match="newer stepsource") as caught:
        await engine.history_of(eid)
    assert "stepsource:FutureEvent" in str(caught.value)


async def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path, eid, _ = await populated(tmp_path)
    tamper(path, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    for suffix in ("-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    fresh = ss.Engine(f"sqlite:///{path}", workers=0)
    with pytest.raises(ss.CorruptLogError, match="damaged"):
        await fresh.state_of(eid)
    await fresh.aclose()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 200)
    engine = ss.Engine(f"sqlite:///{path}", workers=0)
    with pytest.raises(ss.CorruptLogError):
        await engine.executions()
    await engine.aclose()
