"""The executions index: queries, the live runner, rebuilds, and exactly-once tracking.

The index is compared with itself rebuilt from scratch (``ExecutionsIndex.dump`` gives every
row in storage form), with the aggregates that produced the events, and, across a SIGKILL of
the process running it mid-batch, with a fresh fold of the same log.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.codec import EventCodec
from stepsource.engine.readmodels import ReadModels
from stepsource.engine.store import ExecutionStore
from stepsource.projections.executions_index import COLUMNS

DEADLINE = 30.0


def make_engine(url: str, workers: int = 2, cipher_key: str | None = None) -> ss.Engine:
    engine = ss.Engine(url, workers=workers, poll_interval=0.02, cipher_key=cipher_key)

    @engine.step("rm.ok")
    async def ok(ctx: ss.StepContext, n: int) -> int:
        await ctx.set_state("n", n)
        return n

    @engine.step("rm.other", max_retries=0)
    async def other(ctx: ss.StepContext, n: int) -> int:
        await ctx.set_state("n", n)
        if n % 2:
            raise ValueError(f"odd {n}")
        return n

    @engine.step("rm.wait")
    async def wait(ctx: ss.StepContext) -> Any:
        return await ctx.wait_for_event("go")

    return engine


async def rebuilt_rows(engine: ss.Engine) -> list[tuple[Any, ...]]:
    """The index of the engine's log folded from scratch in a separate in-memory index."""
    fresh = ReadModels(engine.store, None, batch_size=7)
    await fresh.catch_up()
    return await anyio.to_thread.run_sync(fresh.index.dump)


async def settle(engine: ss.Engine, count: int) -> None:
    """Wait until ``count`` executions have ended or are waiting."""
    with anyio.fail_after(DEADLINE):
        while True:
            rows = await engine.executions(limit=1000)
            if len(rows) == count and all(
                r.status in ("completed", "failed", "waiting") for r in rows
            ):
                return
            await anyio.sleep(0.02)


# -- the query API ---------------------------------------------------------------------------
@pytest.mark.anyio
async def test_executions_are_served_by_the_index_with_filters_and_paging(
    backend_url: str,
) -> None:
    engine = make_engine(backend_url)
    before = datetime.now(UTC) - timedelta(seconds=1)
    async with engine:
        ids = [(await engine.start("rm.ok", {"n": n})).execution_id for n in range(4)]
        ids += [(await engine.start("rm.other", {"n": n})).execution_id for n in range(2)]
        ids.append((await engine.start("rm.wait")).execution_id)
        await settle(engine, 7)
    # read-your-writes: a client that never ran the runner sees everything at once
    client = ss.Engine(backend_url, workers=0) if backend_url != "memory://" else engine
    rows = await client.executions()
    assert [r.execution_id for r in rows] == ids[::-1]  # newest first
    assert {r.status for r in rows} == {"completed", "failed", "waiting"}
    assert all(r.events == r.version and r.started_at is not None for r in rows)
    assert [r.execution_id for r in await client.executions(step_id="rm.other")] == ids[4:6][::-1]
    failed = await client.executions(status="failed")
    assert [r.execution_id for r in failed] == [ids[5]]
    assert failed[0].last_error == {"type": "ValueError", "message": "ValueError: odd 1"}
    assert failed[0].completed_at is not None
    assert [r.execution_id for r in await client.executions(status="waiting")] == [ids[6]]
    assert len(await client.executions(since=before)) == 7
    assert await client.executions(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert await client.executions(flow_id="no-such-flow") == []

    # paging: offset, and a cursor (the last id of the previous page)
    page1 = await client.executions(limit=3)
    page2 = await client.executions(limit=3, cursor=page1[-1].execution_id)
    page3 = await client.executions(limit=3, offset=6)
    assert [r.execution_id for r in page1 + page2 + page3] == ids[::-1]
    assert await client.executions(limit=3, offset=3) == page2

    with pytest.raises(ss.UsageError, match="unknown status"):
        await client.executions(status="done")
    with pytest.raises(ss.UsageError, match="timezone-aware"):
        await client.executions(since=datetime(2020, 1, 1))
    with pytest.raises(ss.UsageError, match="limit"):
        await client.executions(limit=-1)
    with pytest.raises(ss.UsageError, match="cursor"):
        await client.executions(cursor=str(uuid.uuid4()))
    with pytest.raises(ss.UnknownExecutionError):
        await client.executions(cursor="not-an-id")
    await client.aclose()


@pytest.mark.anyio
async def test_the_live_runner_follows_the_log_and_a_rebuild_gives_the_same_rows(
    backend_url: str,
) -> None:
    engine = make_engine(backend_url)
    readmodels = engine._readmodels
    async with engine:
        for n in range(5):
            await engine.start("rm.ok", {"n": n})
        await engine.start("rm.other", {"n": 1})
        # no query: the runner in the engine's task group catches up by itself
        with anyio.fail_after(DEADLINE):
            while True:
                end = await engine._backend.max_position()
                rows = await anyio.to_thread.run_sync(readmodels.index.dump)
                done = [r for r in rows if r[COLUMNS.index("status")] in ("completed", "failed")]
                if len(done) == 6 and await readmodels.position() == end:
                    break
                await anyio.sleep(0.02)
    incremental = await anyio.to_thread.run_sync(readmodels.index.dump)
    assert incremental == await rebuilt_rows(engine)
    seen: list[tuple[int, int]] = []
    report = await engine.rebuild_projections(progress=lambda p, t: seen.append((p, t)))
    assert report.position == await engine._backend.max_position()  # dense or not (NATS)
    assert report.events == len(await engine._backend.read_all(0, 10**6))
    assert report.executions == 6
    assert seen[0] == (0, report.position)
    assert seen[-1] == (report.position, report.position)
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert await anyio.to_thread.run_sync(readmodels.index.dump) == incremental
    await engine.aclose()


@pytest.mark.anyio
async def test_an_index_left_by_another_log_is_rebuilt(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    first = make_engine(url)
    async with first:
        await (await first.start("rm.ok", {"n": 1})).result(timeout=DEADLINE)
    assert len(await first.executions()) == 1
    await first.aclose()
    for suffix in ("", "-wal", "-shm"):  # the log is replaced; its read models stay behind
        (tmp_path / f"steps.db{suffix}").unlink(missing_ok=True)
    assert (tmp_path / "steps.db.readmodels").exists()

    second = make_engine(url, workers=0)
    for n in range(3):  # a longer log than the first: positions alone cannot tell
        handle = await second.start("rm.ok", {"n": n})
    rows = await second.executions()
    assert len(rows) == 3
    assert rows[0].execution_id == handle.execution_id
    assert await anyio.to_thread.run_sync(second._readmodels.index.dump) == await rebuilt_rows(
        second
    )
    await second.aclose()


@pytest.mark.anyio
async def test_a_damaged_index_file_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    (tmp_path / "steps.db.readmodels").write_bytes(b"this is not a database" * 100)
    engine = make_engine(url, workers=0)
    await engine.start("rm.ok", {"n": 1})
    with pytest.raises(ss.BackendUnavailableError, match=r"readmodels.*delete the file"):
        await engine.executions()
    await engine.aclose()
    (tmp_path / "steps.db.readmodels").unlink()
    assert len(await engine.executions()) == 1
    await engine.aclose()


# -- exactly-once across a SIGKILL mid-batch -------------------------------------------------
RUNNER = """
import os, sys, anyio, stepsource as ss

async def main() -> None:
    engine = ss.Engine(sys.argv[1], workers=0, poll_interval=0.02)
    engine._readmodels.batch_size = int(sys.argv[2])
    async with engine:
        print("runner ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def _index_state(path: Path) -> tuple[int, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        (position,) = conn.execute("SELECT position FROM tracking").fetchone()
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM executions ORDER BY position")
        return int(position), [tuple(r) for r in rows]
    finally:
        conn.close()


def _start_runner(
    url: str, batch: int, tmp_path: Path, name: str, kill_at: str | None
) -> tuple[subprocess.Popen[bytes], Path]:
    """The runner process; its stdout and stderr go to ``name.out`` in the temp dir."""
    env = {k: v for k, v in os.environ.items() if k != "STEPSOURCE_TEST_KILL_AT"}
    if kill_at:
        env["STEPSOURCE_TEST_KILL_AT"] = kill_at
    out = tmp_path / f"{name}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, url, str(batch)],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return proc, out


@pytest.mark.timeout(120)
def test_a_runner_killed_mid_batch_and_restarted_applies_every_event_exactly_once(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    index_path = tmp_path / "steps.db.readmodels"
    batch = 16

    async def populate(count: int, run: bool) -> int:
        engine = make_engine(url, workers=4 if run else 0)
        if run:
            async with engine:
                handles = [await engine.start("rm.other", {"n": n}) for n in range(count)]
                for handle in handles:  # odd inputs fail: their rows carry the error
                    with contextlib.suppress(ss.StepFailedError):
                        await handle.result(timeout=DEADLINE)
        else:  # a client appends StepScheduled only: no runner of its own touches the index
            for n in range(count):
                await engine.start("rm.ok", {"n": n})
        end = await engine._backend.max_position()
        await engine.aclose()
        return end

    end = anyio.run(populate, 12, True)
    for suffix in ("", "-wal", "-shm"):  # forget what the populating engine indexed
        Path(f"{index_path}{suffix}").unlink(missing_ok=True)
    assert end > 3 * batch

    # 1. killed inside the third batch's transaction, after its rows were written
    killed, out = _start_runner(url, batch, tmp_path, "killed", "readmodel-batch:3")
    assert killed.wait(timeout=DEADLINE) == -signal.SIGKILL, out.read_text()
    position, rows = _index_state(index_path)
    assert position == 2 * batch  # nothing of the third batch survived

    async def prefix_rows(upto: int) -> list[tuple[Any, ...]]:
        engine = ss.Engine(url, workers=0)
        fresh = ReadModels(engine.store, None)
        await fresh.catch_up(upto)
        await engine.aclose()
        return await anyio.to_thread.run_sync(fresh.index.dump)

    assert rows == anyio.run(prefix_rows, 2 * batch)

    # 2. more events while no runner runs, then a restarted runner that catches up and
    #    follows what is appended while it runs
    anyio.run(populate, 3, False)
    runner, out = _start_runner(url, batch, tmp_path, "restarted", None)
    try:
        deadline = time.monotonic() + DEADLINE
        while "runner ready" not in out.read_text():
            assert runner.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the runner did not start"
            time.sleep(0.02)
        end = anyio.run(populate, 4, False)
        while _index_state(index_path)[0] != end:
            assert runner.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the runner did not catch up"
            time.sleep(0.05)
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=DEADLINE)
    position, rows = _index_state(index_path)
    assert position == end
    assert rows == anyio.run(prefix_rows, end)  # equal to a rebuild from scratch
    assert all(r[COLUMNS.index("events")] == r[COLUMNS.index("version")] for r in rows)
    assert len(rows) == 12 + 3 + 4


# -- property: incremental equals rebuilt over random interleavings -------------------------
T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Script:
    """Drives one StepExecution aggregate through valid lifecycle operations."""

    def __init__(self, n: int) -> None:
        self.aggregate = StepExecution.schedule(
            execution_id=uuid.UUID(int=n + 1),
            timestamp=T0,
            step_id=f"prop.{n % 2}",
            step_version="1",
            definition={},
            input={"n": n},
            config={},
            correlation_id=f"c{n}",
            priority=n % 3,
        )
        self.seq = 0

    def choices(self) -> list[str]:
        a = self.aggregate
        if a.is_terminal:
            return []
        if not a.attempt_open:
            return ["cancel", "start"]
        if a.suspended:
            return ["cancel", "wake"]
        return ["complete", "set", "set", "retry", "suspend", "fail", "cancel"]

    def apply(self, choice: str, now: datetime) -> None:
        a = self.aggregate
        op = (a.next_attempt_number(), "", self.seq, "1")
        if choice in ("start", "wake"):
            a.lease(timestamp=now, worker_id=f"w{self.seq}", executor="x", lease_expires_ms=0)
            if choice == "start":
                a.start_attempt(timestamp=now, worker_id="w", step_version="1")
                self.seq = 0
        elif choice == "set":
            a.set_state("k", self.seq, timestamp=now, op=op)
        elif choice == "retry":
            a.fail_attempt(timestamp=now, error_type="E", error_message="m", retry_at_ms=1)
        elif choice == "suspend":
            a.suspend("sleep", 5, timestamp=now)
        elif choice == "complete":
            a.complete({"ok": True}, timestamp=now, op=op)
        elif choice == "fail":
            a.fail("bad", None, error_type="fail", timestamp=now, op=op)
        else:
            a.cancel("stop", timestamp=now)
        self.seq += 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), count=st.integers(1, 5), steps=st.integers(0, 60))
def test_incremental_index_equals_a_rebuild_over_random_interleavings(
    data: st.DataObject, count: int, steps: int
) -> None:
    scripts = [Script(n) for n in range(count)]
    store = ExecutionStore(MemoryBackend(), EventCodec(None))
    incremental = ReadModels(store, None)
    batch_sizes = st.integers(1, 6)
    # the incremental index is also told of the commits (engine/index_feed.py), as a running
    # worker's is: some commits are told late (group commit wakes its callers in any
    # order), some never (another process's), and the feed may hold only a few events
    feed = incremental.feed
    assert feed is not None
    feed.limit = data.draw(st.integers(1, 40), label="feed limit")
    told_late: list[tuple[str, int, Sequence[Any]]] = []

    def appended(stream_id: str, last: int, events: Sequence[Any]) -> None:
        how = data.draw(st.sampled_from(["now"] * 4 + ["late", "never"]), label="told")
        if how == "now":
            feed.appended(stream_id, last, events)
        elif how == "late":
            told_late.append((stream_id, last, events))

    def tell_late() -> None:
        for told in data.draw(st.permutations(told_late), label="late order"):
            feed.appended(*told)
        told_late.clear()

    store.appended = appended

    async def main() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        pending = list(range(count))  # the StepScheduled of each is not yet committed
        for clock in range(1, steps + 1):
            live = [i for i in range(count) if i in pending or scripts[i].choices()]
            if not live:
                break
            i = data.draw(st.sampled_from(live), label="execution")
            now = T0 + timedelta(milliseconds=clock)
            if i in pending:
                pending.remove(i)
            else:
                scripts[i].apply(data.draw(st.sampled_from(scripts[i].choices())), now)
            await store.commit(scripts[i].aggregate)
            if data.draw(st.booleans(), label="tell the late ones"):
                tell_late()
            if data.draw(st.booleans(), label="catch up now"):
                incremental.batch_size = data.draw(batch_sizes, label="batch")
                await incremental.catch_up()
            assert len(feed) <= feed.limit
        tell_late()
        await incremental.catch_up()
        rebuilt = ReadModels(store, None, rebuild_batch_size=data.draw(batch_sizes))
        await rebuilt.rebuild()
        return (
            await anyio.to_thread.run_sync(incremental.index.dump),
            await anyio.to_thread.run_sync(rebuilt.index.dump),
        )

    rows, rebuilt = anyio.run(main)
    assert rows == rebuilt
    by_id = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in rows}
    for script in scripts:  # and the rows say what the aggregates say
        a = script.aggregate
        if a.execution_id not in by_id:
            assert a.version == 0 or a.pending_events  # never committed
            continue
        row = by_id[a.execution_id]
        assert (row["status"], row["version"], row["events"]) == (a.status, a.version, a.version)
        assert row["attempt"] == a.attempt


def _is_json(data: bytes) -> bool:
    """Whether ``data`` parses as JSON (a ciphertext may begin with "{" by chance, 1 in 256)."""
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


@pytest.mark.anyio
async def test_an_encrypted_log_is_indexed_by_decoding_every_event(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    key = base64.b64encode(bytes(range(32))).decode()
    secret = make_engine(url, cipher_key=key)
    async with secret:
        handles = [await secret.start("rm.other", {"n": n}) for n in range(3)]
        for handle in handles:
            with contextlib.suppress(ss.StepFailedError):
                await handle.result(timeout=DEADLINE)
    rows = await secret.executions()
    assert [r.status for r in rows] == ["completed", "failed", "completed"]
    assert [(r.events, r.version) for r in rows] == [(5, 5), (6, 6), (5, 5)]
    assert await anyio.to_thread.run_sync(secret._readmodels.index.dump) == await rebuilt_rows(
        secret
    )
    records = await secret._backend.read_all(0, 100)
    assert records
    assert not [r.topic for r in records if _is_json(r.data)]  # no event is stored as plain JSON
    await secret.aclose()


class FailsAfterFirstPage(MemoryBackend):
    """A log whose whole-log reads fail (the backend gone) after the first page."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[Any]:
        self.reads += 1
        if self.reads > 1:
            raise ss.BackendUnavailableError("the backend went away", hint="start it again")
        return await super().read_all(after_position, limit)


@pytest.mark.anyio
async def test_a_backend_failing_while_the_next_page_is_read_raises_its_own_error() -> None:
    """The catch-up reads the next page while it folds this one: the read's error comes out
    as itself, which the runner logs and retries, not inside an ExceptionGroup that would end
    the engine (a Redis restart in the kill loop did)."""
    backend = FailsAfterFirstPage()
    engine = ss.Engine(backend=backend, workers=0)

    @engine.step("rm.page")
    async def page(ctx: ss.StepContext) -> None:
        return None

    async with engine:
        for _ in range(5):
            await engine.start("rm.page")
    fresh = ReadModels(engine.store, None, batch_size=2)  # three pages: a next one to read
    backend.reads = 0
    with pytest.raises(ss.BackendUnavailableError, match="went away"):
        await fresh.catch_up()
    await fresh.aclose()
    await engine.aclose()
