"""Damaged or foreign events are detected, named and set aside; nothing takes a worker down.

Every stored event carries a checksum verified on read; a stored topic resolves only to a
registered event class; an event newer than the code is refused; an execution whose log
cannot be read is quarantined (not run, listed, released once fixed); ``stepsource check``
says what is damaged.
"""

from __future__ import annotations

import base64
import sqlite3
import sys
import uuid
from pathlib import Path

import anyio
import orjson
import pytest

import stepsource as ss
from stepsource.adapters.ports import Commit, NewEvent, RecordedEvent
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.cli import main
from stepsource.engine.codec import EventCodec

pytestmark = pytest.mark.anyio


def waiting_app(path: str, **options: float) -> ss.Engine:
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.02, **options)  # type: ignore[arg-type]
    register(engine)
    return engine


def register(engine: ss.Engine) -> None:
    @engine.step("wait.then.add")
    async def handler(ctx: ss.StepContext) -> int:
        for i in range(3):
            await ctx.set_state(f"k{i}", i)
        got = await ctx.wait_for_event("go")
        return int(got) + 1


#: the app `stepsource verify --app test_integrity:APP` replays
APP = ss.Engine("memory://", workers=0)
register(APP)


async def cli(argv: list[str]) -> int:
    """The command line, in a thread (it runs its own event loop), as a user types it."""
    return await anyio.to_thread.run_sync(main, argv)


def rows(path: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    with connection:
        found = connection.execute(sql, args).fetchall()
    connection.close()
    return found


def state_set(path: str, eid: str, nth: int = 0) -> int:
    """The version of the execution's ``nth`` StateSet event."""
    found = rows(
        path,
        "SELECT version FROM events WHERE stream_id = ? AND topic = 'stepsource:StateSet' "
        "ORDER BY version",
        eid,
    )
    value = found[nth][0]
    assert isinstance(value, int)
    return value


def flip_value(path: str, eid: str, version: int) -> bytes:
    """Change one digit of an event's JSON (still valid JSON); return the original bytes."""
    [(data,)] = rows(
        path, "SELECT data FROM events WHERE stream_id = ? AND version = ?", eid, version
    )
    assert isinstance(data, bytes)
    spoiled = data.replace(b'"value":', b'"value":1', 1)
    assert spoiled != data
    orjson.loads(spoiled)  # the damage is still JSON: only the checksum can see it
    rows(
        path,
        "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
        spoiled,
        eid,
        version,
    )
    return data


async def scheduled(path: str, count: int) -> list[str]:
    """``count`` executions that ran to their wait (versions 1..7 or so each)."""
    engine = waiting_app(path)
    async with engine:
        handles = [await engine.start("wait.then.add") for _ in range(count)]
        with anyio.fail_after(20):
            for handle in handles:
                while (await handle.describe()).status != "waiting":
                    await anyio.sleep(0.02)
    await engine.aclose()
    return [h.execution_id for h in handles]


# -- checksums --------------------------------------------------------------------------------
async def test_a_changed_value_in_a_stored_event_is_refused_naming_execution_and_version(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "log.db")
    [eid] = await scheduled(path, 1)
    [(version,)] = rows(
        path,
        "SELECT version FROM events WHERE stream_id = ? AND topic = 'stepsource:StateSet' "
        "ORDER BY version LIMIT 1",
        eid,
    )
    flip_value(path, eid, int(version))  # type: ignore[call-overload]
    engine = ss.Engine(f"sqlite:///{path}", workers=0)
    with pytest.raises(ss.CorruptLogError) as caught:
        await engine.state_of(eid)
    assert caught.value.execution_id == eid
    assert f"event {version}" in str(caught.value)
    assert "checksum" in str(caught.value)
    await engine.aclose()


async def test_events_written_before_checksums_read_as_before() -> None:
    backend = ss.MemoryBackend() if hasattr(ss, "MemoryBackend") else None
    from stepsource.adapters.memory import MemoryBackend

    backend = MemoryBackend()
    codec = EventCodec()
    eid = str(uuid.uuid4())
    legacy = {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "reason": "old",
    }
    await backend.append(
        Commit(eid, 0, [NewEvent(eid, 1, "stepsource:StepCancelled", orjson.dumps(legacy))])
    )
    [event] = codec.decode_many(await backend.read_stream(eid))
    assert event.reason == "old"  # type: ignore[attr-defined]


# -- topics and class versions ----------------------------------------------------------------
def test_a_stored_topic_never_imports_a_module(tmp_path: Path) -> None:
    module = "stepsource_topic_probe_module"
    (tmp_path / f"{module}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.imported').touch()\n"
        "class Thing:\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        record = RecordedEvent(str(uuid.uuid4()), 1, f"{module}:Thing", b"{}", 1)
        with pytest.raises(ss.UnknownEventError, match="does not know"):
            EventCodec().decode_many([record])
        with pytest.raises(ss.UnknownEventError, match="does not know"):
            EventCodec().decode_reference(record)
    finally:
        sys.path.remove(str(tmp_path))
    assert module not in sys.modules
    assert not (tmp_path / f"{module}.imported").exists()


async def test_an_event_of_a_newer_class_version_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    [eid] = await scheduled(path, 1)
    [(version, data)] = rows(
        path,
        "SELECT version, data FROM events WHERE stream_id = ? AND topic = 'stepsource:StateSet' "
        "ORDER BY version LIMIT 1",
        eid,
    )
    assert isinstance(data, bytes)
    state = orjson.loads(data)
    del state["_c"]
    state["class_version"] = 7  # as a newer release would write it (without a checksum)
    rows(
        path,
        "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
        orjson.dumps(state),
        eid,
        version,
    )
    # a stream never goes back from checked to unchecked: write the whole stream unchecked
    for v, d in rows(path, "SELECT version, data FROM events WHERE stream_id = ?", eid):
        assert isinstance(d, bytes)
        plain = orjson.loads(d)
        plain.pop("_c", None)
        rows(
            path,
            "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
            orjson.dumps(plain),
            eid,
            v,
        )
    engine = ss.Engine(f"sqlite:///{path}", workers=0)
    with pytest.raises(ss.UnknownEventError) as caught:
        await engine.state_of(eid)
    assert caught.value.execution_id == eid
    assert "class_version 7" in str(caught.value)
    assert f"event {version}" in str(caught.value)
    await engine.aclose()


# -- quarantine -------------------------------------------------------------------------------
async def test_an_unreadable_execution_is_quarantined_listed_and_released_once_fixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # for --app test_integrity:APP
    path = str(tmp_path / "log.db")
    bad, *good = await scheduled(path, 3)
    client = ss.Engine(f"sqlite:///{path}", workers=0)
    for eid in (bad, *good):  # the events wait in the inbox; the workers come later
        await client.get_handle(eid).send_event("go", 41)
    await client.aclose()
    damaged = state_set(path, bad)
    original = flip_value(path, bad, damaged)
    # the first engine's index may have folded the event before the damage (it then shows the
    # damage only after a rebuild, which `stepsource check` compares): start from a fresh one,
    # which reads the damaged event
    for leftover in Path(tmp_path).glob("log.db.readmodels*"):
        leftover.unlink()
    before = rows(path, "SELECT COUNT(*) FROM events WHERE stream_id = ?", bad)
    engine = waiting_app(path, lease_seconds=0.5)
    async with engine:
        with anyio.fail_after(20):
            for eid in good:
                assert await engine.get_handle(eid).result() == 42
            while not await engine.executions(status="quarantined"):
                await anyio.sleep(0.05)
        [row] = await engine.executions(status="quarantined")
        assert row.execution_id == bad
        assert row.last_error is not None
        assert row.last_error["version"] == damaged
        assert "checksum" in str(row.last_error["message"])
        with pytest.raises(ss.CorruptLogError):  # a client is told, too
            await engine.get_handle(bad).send_event("go", 41)
        url = f"sqlite:///{path}"
        capsys.readouterr()
        assert await cli(["ls", "--status", "quarantined", "--url", url]) == 0
        assert bad[:8] in capsys.readouterr().out
        assert await cli(["show", bad, "--url", url]) == 3
        shown = capsys.readouterr()
        assert "checksum" in shown.err
        assert "Traceback" not in shown.out + shown.err
        assert await cli(["verify", "--app", "test_integrity:APP", "--url", url]) == 1
        verified = capsys.readouterr().out
        assert "unreadable" in verified
        assert "2 ok" in verified
        await anyio.sleep(1.5)  # three lease periods: nobody leases it again, nothing appended
        assert rows(path, "SELECT COUNT(*) FROM events WHERE stream_id = ?", bad) == before
        [queued] = rows(path, "SELECT due_ms, lease_owner FROM queue WHERE stream_id = ?", bad)
        assert queued[1] is None
        # the fix: the row restored from a backup; the operator releases it
        rows(
            path,
            "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
            original,
            bad,
            damaged,
        )
        assert await cli(["quarantine", "release", bad, "--url", f"sqlite:///{path}"]) == 0
        with anyio.fail_after(20):
            assert await engine.get_handle(bad).result() == 42
        [ended] = [r for r in await engine.executions() if r.execution_id == bad]
        assert ended.status == "completed"  # the index shows it again
        assert not await engine.executions(status="quarantined")
    await engine.aclose()
    capsys.readouterr()


async def test_release_refuses_an_execution_that_still_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log.db")
    [eid] = await scheduled(path, 1)
    flip_value(path, eid, state_set(path, eid))
    assert await cli(["quarantine", "release", eid, "--url", f"sqlite:///{path}"]) == 3
    assert "checksum" in capsys.readouterr().err


async def test_rows_that_are_not_events_never_end_ls_show_or_rebuild_in_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log.db")
    [eid] = await scheduled(path, 1)
    rows(
        path,
        "INSERT INTO events (stream_id, version, topic, data) VALUES "
        "('not-a-uuid', 1, 'stepsource:StepScheduled', x'7b7d')",
    )
    rows(
        path,
        "INSERT INTO events (stream_id, version, topic, data) VALUES "
        f"('{eid}', 99, 'stepsource:StateSet', '{{}}')",
    )
    url = f"sqlite:///{path}"
    for argv in (
        ["ls"],
        ["projections", "rebuild"],
        ["show", eid],
        ["show", "not-a-uuid"],
        ["ls", "--status", "quarantined"],
    ):
        code = await cli([*argv, "--url", url])
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err, argv
        assert code in (0, 1, 2, 3), argv


# -- stepsource check -------------------------------------------------------------------------
async def test_check_beside_running_workers_reports_no_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check read the log, then the index, which had caught up further: every execution
    started or moved on meanwhile was reported as damage ("the index lists it but the log
    has no such stream", "the index is at version 5, the log at 1"), exit 1."""
    path = str(tmp_path / "log.db")
    url = f"sqlite:///{path}"
    engine = ss.Engine(url, poll_interval=0.01, workers=8)

    @engine.step("check.busy")
    async def busy(ctx: ss.StepContext, n: int) -> int:
        for i in range(5):
            await ctx.set_state(f"k{i}", i)
            await ctx.flush()
            await anyio.sleep(0.005)
        return n

    async with engine, anyio.create_task_group() as tg:
        stop = anyio.Event()

        async def starting() -> None:
            n = 0
            while not stop.is_set():
                await engine.start("check.busy", {"n": n})
                n += 1
                await anyio.sleep(0.002)

        tg.start_soon(starting)
        await anyio.sleep(0.3)
        codes = [await cli(["check", "--json", "--url", url]) for _ in range(3)]
        stop.set()
    reports = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [r["damage"] for r in reports] == [[], [], []]
    assert codes == [0, 0, 0]
    assert all(r["executions"] > 0 for r in reports)


async def test_check_exits_0_on_a_sound_store_and_1_naming_the_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log.db")
    eids = await scheduled(path, 2)
    url = f"sqlite:///{path}"
    assert await cli(["check", "--url", url]) == 0
    assert "no damage found" in capsys.readouterr().out
    flip_value(path, eids[1], state_set(path, eids[1], 1))
    rows(path, "DELETE FROM events WHERE stream_id = ? AND version = 2", eids[0])
    assert await cli(["check", "--json", "--url", url]) == 1
    report = orjson.loads(capsys.readouterr().out)
    found = {d["where"]: d["what"] for d in report["damage"]}
    assert "checksum" in found[eids[1]]
    assert "missing" in found[eids[0]]


async def test_check_reports_an_emptied_database_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log.db")
    await scheduled(path, 1)
    Path(path).write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    assert await cli(["check", "--url", f"sqlite:///{path}"]) == 1
    assert "empty" in capsys.readouterr().out
    assert isinstance(SQLiteBackend(path), SQLiteBackend)


async def test_a_worker_with_the_wrong_cipher_key_quarantines_and_keeps_serving(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "log.db")
    right = base64.b64encode(b"r" * 32).decode()
    wrong = base64.b64encode(b"w" * 32).decode()
    engine = waiting_app(path, cipher_key=right)  # type: ignore[arg-type]
    async with engine:
        handle = await engine.start("wait.then.add")
        with anyio.fail_after(20):
            while (await handle.describe()).status != "waiting":
                await anyio.sleep(0.02)
        await handle.send_event("go", 1)
    await engine.aclose()
    eid = handle.execution_id
    mistaken = waiting_app(path, cipher_key=wrong, lease_seconds=0.5)  # type: ignore[arg-type]
    async with mistaken:
        with anyio.fail_after(20):
            while not (found := await mistaken.executions(status="quarantined")):
                await anyio.sleep(0.05)
        assert [r.execution_id for r in found] == [eid]
        # its own executions still run: the worker did not exit
        own = await mistaken.start("wait.then.add")
        with anyio.fail_after(20):
            while (await own.describe()).status != "waiting":
                await anyio.sleep(0.02)
        await own.send_event("go", 1)
        with anyio.fail_after(20):
            assert await own.result() == 2
    await mistaken.aclose()
    fixed = waiting_app(path, cipher_key=right)  # type: ignore[arg-type]
    async with fixed:
        await fixed.release_quarantine(eid, fixed.clock.now_ms())
        with anyio.fail_after(20):
            assert await fixed.get_handle(eid).result() == 2
    await fixed.aclose()


async def test_check_finds_a_flipped_byte_in_an_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log.db")
    [eid] = await scheduled(path, 1)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    [(root,)] = connection.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_events_1'"
    ).fetchall()
    [(page_size,)] = connection.execute("PRAGMA page_size").fetchall()
    connection.close()
    content = bytearray(Path(path).read_bytes())
    page = slice((root - 1) * page_size, root * page_size)
    at = content[page].rfind(eid.encode())
    assert at >= 0
    content[page.start + at + 3] ^= 0x01  # one bit of a key in the unique index
    Path(path).write_bytes(bytes(content))
    assert await cli(["check", "--url", f"sqlite:///{path}"]) == 1
    assert "missing from index" in capsys.readouterr().out
