"""A rebuild read by helper processes builds the index a rebuild alone builds.

Helpers are real Python processes opening the same backend (a SQLite file, a server); the
rebuilding process folds their pages in log order. Each test compares the index rows
(``ReadModels.dump``) with those of a rebuild with ``rebuild_processes=0``, on logs with
damage (a flipped byte, an unknown topic, a checksum stripped), gaps in the positions,
encryption, page sizes that split every run, helpers killed midway and a rebuild cancelled
midway. ``HELPERS_FROM`` is set to 0 so that small logs take the helpers' path.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.engine import rebuild_helpers
from stepsource.engine.checksums import strip_checksum
from stepsource.errors import UsageError

KEY = base64.b64encode(b"r" * 32).decode()


@pytest.fixture(autouse=True)
def helpers_for_any_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rebuild_helpers, "HELPERS_FROM", 0)


def _register(engine: ss.Engine) -> None:
    @engine.step("rh.done")
    async def done(ctx: ss.StepContext, n: int) -> int:
        for i in range(n):
            await ctx.set_state(f"k{i % 3}", i)
            if i % 4 == 3:
                await ctx.flush()
        await ctx.do("count", lambda: n)
        return n

    @engine.step("rh.fails", max_retries=0)
    async def fails(ctx: ss.StepContext, n: int) -> None:
        await ctx.set_state("n", n)
        raise ValueError(f"no {n}")

    @engine.step("rh.waits")
    async def waits(ctx: ss.StepContext, n: int) -> int:
        await ctx.set_state("n", n)
        return int(await ctx.wait_for_event("go", timeout=3600))


async def _build(url: str, key: str | None = None) -> int:
    """A log of executions run eight at a time (their events interleaved): completed, failed
    and waiting; its end position."""
    engine = ss.Engine(url, workers=8, poll_interval=0.02, cipher_key=key, rebuild_processes=0)
    _register(engine)
    async with engine:
        handles = [await engine.start("rh.done", {"n": 3 + i % 9}) for i in range(24)]
        handles += [await engine.start("rh.fails", {"n": i}) for i in range(3)]
        waiting = [await engine.start("rh.waits", {"n": i}) for i in range(3)]
        with anyio.fail_after(60):
            for handle in handles:
                with contextlib.suppress(ss.StepFailedError):
                    await handle.result()
            for handle in waiting:
                while (await handle.describe()).status != "waiting":
                    await anyio.sleep(0.02)
        end = await engine.store.backend.max_position()
    await engine.aclose()
    return int(end)


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("helpers") / "log.db"
    anyio.run(_build, f"sqlite:///{path}")
    return path


def _copy(log: Path, to: Path) -> str:
    shutil.copy(log, to / "log.db")
    return f"sqlite:///{to / 'log.db'}"


async def _rebuilt(
    url: str, processes: int, *, page: int = 23, key: str | None = None
) -> tuple[Any, list[tuple[Any, ...]]]:
    engine = ss.Engine(url, workers=0, rebuild_processes=processes, cipher_key=key)
    engine._readmodels.rebuild_batch_size = page
    try:
        report = await engine.rebuild_projections()
        return report, await engine._readmodels.dump()
    finally:
        await engine.aclose()


def _helpers_now() -> list[int]:
    """This process's helper processes still running (their command line names them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == os.getpid() and b"rebuild_helpers" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("backend_url", ["sqlite", "nats", "redis", "postgres"], indirect=True)
@pytest.mark.anyio
async def test_helpers_fold_the_index_a_rebuild_alone_folds(backend_url: str) -> None:
    await _build(backend_url)
    alone, expected = await _rebuilt(backend_url, 0)
    helped, rows = await _rebuilt(backend_url, 2, page=17)
    assert rows == expected
    assert (helped.events, helped.executions, helped.position) == (
        alone.events,
        alone.executions,
        alone.position,
    )
    # NATS positions leave room for a message's events (most go unused): they do not size a
    # catch-up nor split it into ranges, so a NATS log is read by the rebuild itself
    sparse = backend_url.startswith("nats")
    assert (alone.helpers, helped.helpers) == (0, 0 if sparse else 2)


@pytest.mark.anyio
async def test_a_log_no_other_process_can_open_is_rebuilt_without_helpers(tmp_path: Path) -> None:
    """A log in memory, or a backend object handed to the engine (helpers open the backend
    by its URL), is read by the rebuild itself."""
    handed = ss.Engine(backend=ss.Engine(f"sqlite:///{tmp_path / 'x.db'}").store.backend)
    for engine in (ss.Engine("memory://", rebuild_processes=2), handed):
        _register(engine)
        async with engine:
            await (await engine.start("rh.done", {"n": 2})).result()
            report = await engine.rebuild_projections()
        assert (report.helpers, report.executions) == (0, 1)


@pytest.mark.anyio
async def test_helpers_read_the_default_file_of_an_engine_without_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``Engine()`` opens ./stepsource.db; its helpers open the same file (they are handed
    no URL either, and run in the same directory)."""
    monkeypatch.chdir(tmp_path)
    await _build(f"sqlite:///{tmp_path / 'stepsource.db'}")
    engine = ss.Engine(workers=0, rebuild_processes=2)  # no runner: only the rebuild reads
    try:
        report = await engine.rebuild_projections()
    finally:
        await engine.aclose()
    assert (report.helpers, report.executions) == (2, 30)
    assert not [r for r in caplog.records if "without helper processes" in r.getMessage()]


@pytest.mark.anyio
async def test_damage_and_gaps_read_by_helpers_equal_a_rebuild_alone(
    sqlite_log: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = _copy(sqlite_log, tmp_path)
    with sqlite3.connect(tmp_path / "log.db") as conn:
        stored = conn.execute("SELECT position, stream_id, version, topic, data FROM events")
        records = {row[0]: row[1:] for row in stored}
        # three executions damaged, whatever the interleaving of the executions' events: each
        # damage in a stream of its own, on an event after its stream's first (a stripped
        # checksum shows after a checksummed event) and outside the gaps made below
        chosen: list[int] = []
        for start in (40, 75, 120):
            chosen.append(
                next(
                    position
                    for position in sorted(records)[start:]
                    if position < 200
                    and position % 97
                    and records[position][1] > 1
                    and records[position][0] not in {records[c][0] for c in chosen}
                )
            )
        flip, strip, unknown = chosen
        data = records[flip][3]
        flipped = data[:30] + bytes([data[30] ^ 1]) + data[31:]
        conn.execute("UPDATE events SET data = ? WHERE position = ?", (flipped, flip))
        stream, version, topic, data = records[strip]
        stripped, _ = strip_checksum(stream, version, topic, data)
        conn.execute("UPDATE events SET data = ? WHERE position = ?", (stripped, strip))
        conn.execute("UPDATE events SET topic = 'no:Such' WHERE position = ?", (unknown,))
        # gaps: a range longer than a page, and single positions
        conn.execute("DELETE FROM events WHERE position BETWEEN 200 AND 260 OR position % 97 = 0")
    _, expected = await _rebuilt(url, 0)
    alone_said = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    caplog.clear()
    helped, rows = await _rebuilt(url, 2)
    assert helped.helpers == 2
    assert rows == expected
    assert sum("quarantined" in row for row in rows) == 3
    # the rebuilding process words each quarantine as a rebuild alone does
    said = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert said == alone_said
    assert said


@pytest.mark.anyio
async def test_helpers_decrypt_an_encrypted_log_with_the_engines_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sealed.db'}"
    await _build(url, KEY)
    _, expected = await _rebuilt(url, 0, key=KEY)
    helped, rows = await _rebuilt(url, 2, key=KEY)
    assert helped.helpers == 2
    assert rows == expected
    assert len(rows) == 30


@pytest.mark.parametrize("how", ["killed", "stopped"])
@pytest.mark.anyio
async def test_helpers_that_fail_midway_leave_the_rest_to_the_rebuild(
    sqlite_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """Helpers SIGKILLed after the first page end their output; helpers SIGSTOPped (in life:
    stuck reaching their backend) answer nothing and fail after ANSWER_TIMEOUT. Either way
    the rebuild folds the rest itself, counts every event once and leaves no helper."""
    url = _copy(sqlite_log, tmp_path)
    _, expected = await _rebuilt(url, 0)
    engine = ss.Engine(url, workers=0, rebuild_processes=2)
    engine._readmodels.rebuild_batch_size = 3
    hit: list[int] = []

    def fail_helpers(position: int, target: int) -> None:
        if position > 0 and not hit:
            # short from now on (not for the first page: a loaded machine starts helpers slowly)
            monkeypatch.setattr(rebuild_helpers, "ANSWER_TIMEOUT", 0.5)
            hit.extend(_helpers_now())
            for pid in hit:
                os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    with anyio.fail_after(30):
        report = await engine.rebuild_projections(progress=fail_helpers)
    rows = await engine._readmodels.dump()
    await engine.aclose()
    assert len(hit) == 2
    assert rows == expected
    assert report.events == report.position == await _log_events(tmp_path / "log.db")
    assert any("without helper processes" in r.getMessage() for r in caplog.records)
    assert not _helpers_now()


async def _log_events(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


@pytest.mark.anyio
async def test_a_cancelled_rebuild_ends_its_helpers(sqlite_log: Path, tmp_path: Path) -> None:
    url = _copy(sqlite_log, tmp_path)
    _, expected = await _rebuilt(url, 0)
    engine = ss.Engine(url, workers=0, rebuild_processes=2)
    engine._readmodels.rebuild_batch_size = 11
    with anyio.CancelScope() as scope:

        def cancel(position: int, target: int) -> None:
            if position > 0:  # the first page is folded (0: the rebuild's start)
                assert len(_helpers_now()) == 2
                scope.cancel()

        await engine.rebuild_projections(progress=cancel)
    assert scope.cancelled_caught
    assert not _helpers_now()
    # what it folded stays; a query folds the rest
    await engine.executions(limit=1)
    assert await engine._readmodels.dump() == expected
    await engine.aclose()


@pytest.mark.anyio
async def test_a_first_catch_up_of_a_large_backlog_uses_helpers_once(
    sqlite_log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index that starts empty (kept in memory on NATS, or its file deleted) catches up
    with helpers; the catch-ups that start together (the read-model runner, a query) share
    one set of them, and the small catch-ups after it fold by themselves."""
    url = _copy(sqlite_log, tmp_path)
    monkeypatch.setattr(rebuild_helpers, "HELPERS_FROM", 100)  # the log holds a few hundred
    _, expected = await _rebuilt(url, 0)
    (tmp_path / "log.db.readmodels").unlink()
    engine = ss.Engine(url, workers=1, rebuild_processes=2, poll_interval=0.02)
    _register(engine)
    async with engine, anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(engine.executions)
    assert await engine._readmodels.dump() == expected
    assert engine._readmodels.helpers_started == 2
    await engine.aclose()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page=st.integers(1, 120), processes=st.integers(1, 3))
def test_any_page_size_and_helper_count_fold_the_same_index(
    sqlite_log: Path, page: int, processes: int
) -> None:
    async def compare() -> None:
        _, expected = await _rebuilt(url, 0, page=page)
        helped, rows = await _rebuilt(url, processes, page=page)
        assert helped.helpers == processes
        assert rows == expected

    url = f"sqlite:///{sqlite_log}"
    anyio.run(compare)


def test_a_small_log_and_a_zero_setting_start_no_helpers(
    sqlite_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{sqlite_log}"
    monkeypatch.setattr(rebuild_helpers, "HELPERS_FROM", 10**9)
    small, _ = anyio.run(_rebuilt, url, 2)
    none, _ = anyio.run(_rebuilt, url, 0)
    assert (small.helpers, none.helpers) == (0, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_rebuild_processes_must_be_a_count(bad: Any) -> None:
    with pytest.raises(UsageError, match="rebuild_processes must be an int >= 0"):
        ss.Engine("memory://", rebuild_processes=bad)


def test_the_default_is_one_helper_per_core_and_none_on_one_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for cores, expected in ((1, 0), (2, 2), (3, 3), (16, rebuild_helpers.MAX_HELPERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert rebuild_helpers.default_processes() == expected


def test_the_key_never_shows_in_the_spec() -> None:
    spec = rebuild_helpers.HelperSpec("sqlite:///x.db", KEY, 2)
    assert KEY not in repr(spec)
