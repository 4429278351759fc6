"""The executions index folds this process's own commits from the feed (engine/index_feed.py)
instead of reading them back from the log, and ends with the rows a rebuild from the log
gives: whatever order the commits are told in, with commits never told (another process's),
with a feed too small to hold them all, and with a live worker on every backend whose
positions are dense (NATS, whose are not, reads the log as before).

The hypothesis property of the same equivalence over random lifecycles is
``test_incremental_index_equals_a_rebuild_over_random_interleavings`` (tests/test_readmodels.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import RecordedEvent
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.codec import EventCodec
from stepsource.engine.encrypted_log import SAMPLE
from stepsource.engine.index_feed import IndexFeed
from stepsource.engine.readmodels import ReadModels
from stepsource.engine.store import ExecutionStore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DEADLINE = 30.0


class CountingBackend(MemoryBackend):
    """The memory backend, counting the records the index reads from the log."""

    def __init__(self) -> None:
        super().__init__()
        self.records_read = 0

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        records = await super().read_all(after_position, limit)
        self.records_read += len(records)
        return records


class Run:
    """One execution driven through scheduling, a start, buffered writes and completion,
    committed step by step into ``store``."""

    def __init__(self, store: ExecutionStore, n: int) -> None:
        self.store = store
        self.aggregate = StepExecution.schedule(
            execution_id=uuid.UUID(int=n + 1),
            timestamp=T0,
            step_id="feed.step",
            step_version="1",
            definition={},
            input={"n": n},
            config={},
            correlation_id=f"c{n}",
            priority=0,
        )
        self.seq = 0

    def at(self) -> datetime:
        self.seq += 1
        return T0 + timedelta(milliseconds=self.seq)

    async def start(self) -> None:
        a = self.aggregate
        a.lease(timestamp=self.at(), worker_id="w", executor="x", lease_expires_ms=0)
        a.start_attempt(timestamp=self.at(), worker_id="w", step_version="1")
        await self.store.commit(a)

    async def write(self, count: int) -> None:
        """``count`` state writes in one commit (a run of light events)."""
        a = self.aggregate
        for _ in range(count):
            a.set_state("k", self.seq, timestamp=self.at(), op=(1, "", self.seq, "1"))
        await self.store.commit(a)

    async def complete(self) -> None:
        a = self.aggregate
        a.complete({"n": self.seq}, timestamp=self.at(), op=(1, "", self.seq, "1"))
        await self.store.commit(a)


def fed(batch_size: int) -> tuple[CountingBackend, ExecutionStore, ReadModels, IndexFeed]:
    """A store on the counting memory backend and an index with its feed (not yet told of
    the store's commits: each test says how they reach it)."""
    backend = CountingBackend()
    store = ExecutionStore(backend, EventCodec(None))
    models = ReadModels(store, None, batch_size=batch_size)
    assert models.feed is not None
    return backend, store, models, models.feed


async def dump(models: ReadModels) -> list[tuple[Any, ...]]:
    return await anyio.to_thread.run_sync(models.index.dump)


async def rebuilt(store: ExecutionStore) -> list[tuple[Any, ...]]:
    fresh = ReadModels(store, None, rebuild_batch_size=3)
    await fresh.rebuild()
    return await dump(fresh)


async def lifecycles(store: ExecutionStore, runs: int = 3) -> None:
    """``runs`` executions whose commits interleave: runs of light events within a commit
    and across commits of one execution, broken by the others' events."""
    each = [Run(store, n) for n in range(runs)]
    for run in each:
        await store.commit(run.aggregate)
    for run in each:
        await run.start()
    for run in each:
        await run.write(3)
        await run.write(1)
    await each[0].write(2)  # follows its own previous commit in the log: one run across two
    for run in each:
        await run.complete()


@pytest.mark.anyio
async def test_commits_told_to_the_feed_are_folded_without_reading_the_log() -> None:
    backend, store, models, feed = fed(batch_size=4)
    store.appended = feed.appended
    await lifecycles(store)
    folded = await models.catch_up()
    assert folded == await backend.max_position()
    assert backend.records_read == 0  # every page came from the feed
    assert feed.pages > 0
    assert len(feed) == 0  # nothing held once folded
    assert await dump(models) == await rebuilt(store)


@pytest.mark.anyio
async def test_commits_told_in_any_order_or_never_end_in_the_rows_of_a_rebuild() -> None:
    backend, store, models, feed = fed(batch_size=4)
    told: list[tuple[str, int, Any]] = []
    store.appended = lambda *commit: told.append(commit)
    await lifecycles(store)
    # the group commit woke its callers in reverse order, and one commit in the middle is
    # another process's (never told here)
    told.pop(len(told) // 2)
    for commit in reversed(told):
        feed.appended(*commit)
    await models.catch_up()
    # the log was read from the untold commit on (one page), the rest came from the feed
    assert backend.records_read > 0
    assert backend.records_read < await backend.max_position()
    assert feed.pages >= 2  # before the untold commit and after the page read around it
    assert len(feed) == 0  # what the log page covered was dropped from the feed
    assert await dump(models) == await rebuilt(store)


@pytest.mark.anyio
async def test_a_full_feed_keeps_no_more_commits_which_the_log_then_gives() -> None:
    backend, store, models, feed = fed(batch_size=5)
    feed.limit = 4
    sizes: list[int] = []

    def appended(stream_id: str, last: int, events: Any) -> None:
        feed.appended(stream_id, last, events)
        sizes.append(len(feed))

    store.appended = appended
    await lifecycles(store, runs=4)
    assert max(sizes) <= 4  # never more than the bound, whatever a process appends
    await models.catch_up()
    # what the log gave, past the last records a keyless store reads once to tell an
    # encrypted log (engine/encrypted_log.py)
    given = backend.records_read - SAMPLE
    assert 0 < given < await backend.max_position()
    assert feed.pages > 0  # the first commits, the ones the index needed first
    assert await dump(models) == await rebuilt(store)


@pytest.mark.anyio
async def test_a_feed_page_stops_at_the_catch_up_target() -> None:
    store = ExecutionStore(MemoryBackend(), EventCodec(None))
    models = ReadModels(store, None)
    assert models.feed is not None
    store.appended = models.feed.appended
    await lifecycles(store, runs=2)
    end = await store.backend.max_position()
    middle = end // 2
    await models.catch_up(middle)
    assert await models.position() <= middle
    await models.catch_up()
    assert await models.position() == end
    assert await dump(models) == await rebuilt(store)


def make_engine(url: str) -> ss.Engine:
    engine = ss.Engine(url, workers=4, poll_interval=0.02)

    @engine.step("feed.writer", max_retries=1, retry=ss.RetryPolicy(initial=0.01))
    async def writer(ctx: ss.StepContext, n: int) -> int:
        for i in range(4):
            await ctx.set_state(f"k{i % 2}", i)  # buffered: one commit of several events
        await ctx.do("side effect", lambda: n)
        if n % 3 == 0 and ctx.info.attempt_number == 1:
            raise ValueError("first attempt fails")
        return n

    return engine


@pytest.mark.anyio
async def test_a_live_worker_folds_its_own_commits_from_the_feed(backend_url: str) -> None:
    engine = make_engine(backend_url)
    models = engine._readmodels
    async with engine:
        assert (engine.store.appended is not None) == engine.store.backend.dense_positions
        handles = [await engine.start("feed.writer", {"n": n}) for n in range(8)]
        with anyio.fail_after(DEADLINE):
            assert [await h.result() for h in handles] == list(range(8))
            while await models.position() < await engine.store.backend.max_position():
                await anyio.sleep(0.02)
    assert engine.store.appended is None  # nobody listens once the runner stopped
    if engine.store.backend.dense_positions:
        assert models.feed is not None
        assert models.feed.pages > 0
    else:  # NATS: positions a commit's events take are not consecutive; the log is read
        assert models.feed is None
    fresh = ReadModels(engine.store, None, batch_size=7)
    await fresh.catch_up()
    assert await dump(models) == await dump(fresh)
    await engine.aclose()
