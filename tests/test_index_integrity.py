"""The executions index does not serve damage its light path used to miss, and ``stepsource
check`` compares the index with the log row by row, so damage after a fold shows at once.

Each test damages a real SQLite file by hand (``sqlite3``), as an operator or a faulty disk
would: an event stripped of its checksum in place, a forged event without one appended to a
stream the index already folded, a value changed after the fold, an index row edited.
"""

from __future__ import annotations

import base64
import dataclasses
import sqlite3
from pathlib import Path

import anyio
import orjson
import pytest

import stepsource as ss
from stepsource.cli import main
from stepsource.engine.integrity import check_index, check_log

pytestmark = pytest.mark.anyio


def app(path: Path, snapshot_every: int | None = None) -> ss.Engine:
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.02, snapshot_every=snapshot_every)

    @engine.step("idx.wait")
    async def handler(ctx: ss.StepContext) -> int:
        for i in range(3):
            await ctx.set_state(f"k{i}", i)
        got = await ctx.wait_for_event("go")
        return int(got)

    return engine


def sql(path: Path | str, statement: str, *args: object) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    with connection:
        found = connection.execute(statement, args).fetchall()
    connection.close()
    return found


async def cli(argv: list[str]) -> int:
    return await anyio.to_thread.run_sync(main, argv)


async def waiting(path: Path, count: int = 2) -> list[str]:
    """``count`` executions that ran to their wait, the index folded through their ends."""
    engine = app(path)
    async with engine:
        handles = [await engine.start("idx.wait") for _ in range(count)]
        with anyio.fail_after(20):
            for handle in handles:
                while (await handle.describe()).status != "waiting":
                    await anyio.sleep(0.02)
        assert {r.status for r in await engine.executions()} == {"waiting"}
    await engine.aclose()
    return [h.execution_id for h in handles]


def version_of(path: Path, eid: str, topic: str) -> int:
    [(version, *_)] = sql(
        path,
        "SELECT version FROM events WHERE stream_id = ? AND topic = ? ORDER BY version LIMIT 1",
        eid,
        f"stepsource:{topic}",
    )
    assert isinstance(version, int)
    return version


def without_checksum(path: Path, eid: str, version: int) -> tuple[str, bytes]:
    """The event's topic and its JSON without the checksum member: exactly the fields of its
    class, as an event written before checksums existed (or forged) looks."""
    [(topic, data)] = sql(
        path, "SELECT topic, data FROM events WHERE stream_id = ? AND version = ?", eid, version
    )
    assert isinstance(topic, str)
    assert isinstance(data, bytes)
    state = orjson.loads(data)
    del state["_c"]
    return topic, orjson.dumps(state)


async def index_row(path: Path, eid: str) -> ss.ExecutionSummary:
    engine = app(path).derive(workers=0)
    try:
        [row] = [r for r in await engine.executions() if r.execution_id == eid]
        return row
    finally:
        await engine.aclose()


@pytest.mark.parametrize("topic", ["StateSet", "StepStarted"])
async def test_an_event_stripped_of_its_checksum_in_place_is_quarantined_by_the_index(
    tmp_path: Path, topic: str
) -> None:
    """Mid-stream, on an event the index reads only lightly (StateSet) and on one it decodes
    (StepStarted); the index is folded afresh, so the whole stream is in one page."""
    path = tmp_path / "log.db"
    damaged, sound = await waiting(path)
    version = version_of(path, damaged, topic)
    _, stripped = without_checksum(path, damaged, version)
    sql(
        path,
        "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
        stripped,
        damaged,
        version,
    )
    Path(f"{path}.readmodels").unlink()
    row = await index_row(path, damaged)
    assert row.status == "quarantined"
    assert row.last_error is not None
    assert row.last_error["version"] == version
    assert "has no checksum" in str(row.last_error["message"])
    assert (await index_row(path, sound)).status == "waiting"


async def test_a_forged_event_without_checksum_appended_after_the_fold_is_quarantined(
    tmp_path: Path,
) -> None:
    """The index already folded the stream; the forged event comes alone in the next page,
    so the index looks at the event before it in the log to know the stream had checksums."""
    path = tmp_path / "log.db"
    damaged, sound = await waiting(path)
    [(last, *_)] = sql(path, "SELECT max(version) FROM events WHERE stream_id = ?", damaged)
    assert isinstance(last, int)
    topic, forged = without_checksum(path, damaged, version_of(path, damaged, "StateSet"))
    sql(
        path,
        "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)",
        damaged,
        last + 1,
        topic,
        forged,
    )
    row = await index_row(path, damaged)  # the same index file, caught up by one event
    assert row.status == "quarantined"
    assert row.last_error is not None
    assert row.last_error["version"] == last + 1
    assert "has no checksum" in str(row.last_error["message"])
    assert (await index_row(path, sound)).status == "waiting"


async def test_check_shows_an_event_damaged_after_the_index_folded_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.db"
    url = f"sqlite:///{path}"
    damaged, sound = await waiting(path)
    assert await cli(["check", "--url", url]) == 0
    capsys.readouterr()
    version = version_of(path, damaged, "StateSet")
    [(data,)] = sql(
        path, "SELECT data FROM events WHERE stream_id = ? AND version = ?", damaged, version
    )
    assert isinstance(data, bytes)
    spoiled = data.replace(b'"value":', b'"value":1', 1)
    assert spoiled != data
    sql(
        path,
        "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
        spoiled,
        damaged,
        version,
    )
    # the index folded that event before the damage: it still lists the execution as waiting
    assert (await index_row(path, damaged)).status == "waiting"
    assert await cli(["check", "--json", "--url", url]) == 1
    report = orjson.loads(capsys.readouterr().out)
    found = {d["where"]: d["what"] for d in report["damage"]}
    assert set(found) == {damaged}
    assert f"event {version}" in found[damaged]
    assert "checksum" in found[damaged]
    assert "the index still shows it waiting" in found[damaged]
    # and a rebuild, as check says, quarantines it
    assert await cli(["projections", "rebuild", "--url", url]) == 0
    assert (await index_row(path, damaged)).status == "quarantined"
    assert (await index_row(path, sound)).status == "waiting"


async def test_check_compares_each_index_row_with_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index row edited by hand (SQLite's own integrity check sees a sound file) differs
    from the summary folded again from the log: check names the execution and the column."""
    path = tmp_path / "log.db"
    url = f"sqlite:///{path}"
    edited, sound = await waiting(path)
    sql(
        f"{path}.readmodels",
        "UPDATE executions SET status = 'completed', attempt = 7 WHERE execution_id = ?",
        edited,
    )
    assert await cli(["check", "--json", "--url", url]) == 1
    report = orjson.loads(capsys.readouterr().out)
    found = {d["where"]: d["what"] for d in report["damage"]}
    assert set(found) == {edited}
    assert "status ('completed' in the index, 'waiting' in the log)" in found[edited]
    assert "attempt (7 in the index, 1 in the log)" in found[edited]
    assert await cli(["projections", "rebuild", "--url", url]) == 0
    capsys.readouterr()
    assert await cli(["check", "--url", url]) == 0
    assert (await index_row(path, edited)).status == "waiting"
    assert sound != edited


async def test_a_read_that_starts_after_a_snapshot_refuses_a_forged_event_without_checksum(
    tmp_path: Path,
) -> None:
    """A load from a snapshot (or any read that starts inside a stream) does not see the
    events before it: the event before its first one tells whether that one may lack a
    checksum, so a forged event right after the snapshot is refused, not folded."""
    path = tmp_path / "log.db"
    engine = app(path, snapshot_every=1)  # a snapshot after every commit: loads start at the end
    async with engine:
        handle = await engine.start("idx.wait")
        with anyio.fail_after(20):
            while (await handle.describe()).status != "waiting":
                await anyio.sleep(0.02)
    await engine.aclose()
    eid = handle.execution_id
    [(last, *_)] = sql(path, "SELECT max(version) FROM events WHERE stream_id = ?", eid)
    assert isinstance(last, int)
    [(snapshot, *_)] = sql(path, "SELECT version FROM snapshots WHERE stream_id = ?", eid)
    assert snapshot == last  # the next load reads only what comes after
    topic, forged = without_checksum(path, eid, version_of(path, eid, "StateSet"))
    sql(
        path,
        "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)",
        eid,
        last + 1,
        topic,
        forged,
    )
    reader = app(path, snapshot_every=1).derive(workers=0)
    try:
        for query in (reader.state_of, reader.describe):
            with pytest.raises(ss.CorruptLogError, match=f"event {last + 1} .* has no checksum"):
                await query(eid)
        with pytest.raises(ss.CorruptLogError, match="has no checksum"):
            await reader.events(eid, from_version=last + 1)
    finally:
        await reader.aclose()


async def test_check_finds_no_damage_in_a_sound_log_on_every_backend(backend_url: str) -> None:
    """The row-by-row comparison has no false alarm, wherever the index lives (a local
    SQLite file, or PostgreSQL's own tables): executions completed, failed with an error,
    retrying and waiting, all read back equal."""
    await _sound_log_checks_clean(ss.Engine(backend_url, poll_interval=0.02))


async def test_an_encrypted_logs_index_equals_the_log(tmp_path: Path) -> None:
    """The index decrypts each record once and reads it as plaintext: its rows equal the
    summaries folded from the log decoded whole (errors compared redacted)."""
    key = base64.b64encode(b"k" * 32).decode()
    engine = ss.Engine(f"sqlite:///{tmp_path / 'sealed.db'}", poll_interval=0.02, cipher_key=key)
    await _sound_log_checks_clean(engine)


async def _sound_log_checks_clean(engine: ss.Engine) -> None:

    @engine.step("idx.done")
    async def done(ctx: ss.StepContext, n: int) -> int:
        await ctx.set_state("n", n)
        return n

    @engine.step("idx.fails")
    async def fails(ctx: ss.StepContext) -> None:
        raise RuntimeError("it fails, with a message the index keeps")

    @engine.step("idx.retries", max_retries=3, retry=ss.RetryPolicy(initial=60))
    async def retries(ctx: ss.StepContext) -> None:
        raise ConnectionError("later")

    @engine.step("idx.waits")
    async def waits(ctx: ss.StepContext) -> str:
        return str(await ctx.wait_for_event("never"))

    async with engine:
        handles = [await engine.start("idx.done", {"n": n}) for n in range(3)]
        handles += [await engine.start(step) for step in ("idx.fails", "idx.retries", "idx.waits")]
        wanted = ["completed"] * 3 + ["failed", "retrying", "waiting"]
        with anyio.fail_after(30):
            for handle, status in zip(handles, wanted, strict=True):
                while (await handle.describe()).status != status:
                    await anyio.sleep(0.02)
        report = await check_log(engine.store)
        rows = await engine.executions(limit=100)
    await engine.aclose()
    assert report.executions == len(rows) == 6
    redact = engine.store.codec.encrypted
    check_index(report, rows, redact_errors=redact)
    assert report.damage == []
    # and it would say so: one column changed in one row
    changed = [dataclasses.replace(rows[0], attempt=rows[0].attempt + 1), *rows[1:]]
    check_index(report, changed, redact_errors=redact)
    assert [d.where for d in report.damage] == [rows[0].execution_id]
