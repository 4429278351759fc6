"""A NATS backend object reads its own recent commits back from memory: a read of the whole
log (the read-model runner reads back every event the engine appends) answers exactly as the
server does, with other processes' commits between its own, and once its memory has dropped
the oldest."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepsource.adapters.contract import make_commit
from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.recent import RecentCommits
from stepsource.adapters.nats.wire import NatsOptions
from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.testing.nats_server import NatsServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(Path(tmp_path_factory.mktemp("nats"))) as server:
        yield server


@pytest.fixture
async def three(
    nats_server: NatsServer, anyio_backend: str
) -> AsyncIterator[tuple[NatsBackend, NatsBackend, NatsBackend]]:
    """Three objects (as of three processes) on one fresh tenant."""
    options = NatsOptions((f"127.0.0.1:{nats_server.port}",), stream=f"R{uuid.uuid4().hex[:12]}")
    stores = (NatsBackend(options), NatsBackend(options), NatsBackend(options))
    for store in stores:
        await store.open()
    yield stores
    for store in stores:
        await store.aclose()


async def _every_read(store: Backend, positions: list[int]) -> list[list[RecordedEvent]]:
    """``read_all`` from before the log and from every position, with every limit."""
    reads = []
    for after in [0, *positions]:
        for limit in range(1, len(positions) + 2):
            reads.append(await store.read_all(after, limit))
    return reads


@pytest.mark.anyio
async def test_own_commits_read_back_from_memory_answer_as_the_server(
    three: tuple[NatsBackend, NatsBackend, NatsBackend],
) -> None:
    mine, other, fresh = three
    await mine.append(make_commit("a", 0, 1))
    await other.append(make_commit("b", 0, 2))  # another process's commit between two of ours
    await mine.append(make_commit("a", 1, 3))
    await mine.append(make_commit("c", 0, 1))
    await other.append(make_commit("b", 2, 1))
    assert len(mine.log.recent) == 3  # its own three commits, not the other's
    everything = await fresh.read_all()
    assert [(e.stream_id, e.version) for e in everything] == [
        ("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("a", 4), ("c", 1), ("b", 3)
    ]  # fmt: skip
    positions = [e.position for e in everything]
    assert await _every_read(mine, positions) == await _every_read(fresh, positions)


@pytest.mark.anyio
async def test_commits_dropped_from_memory_are_read_from_the_server(
    three: tuple[NatsBackend, NatsBackend, NatsBackend],
) -> None:
    mine, other, fresh = three
    mine.log.recent.max_commits = 2
    for version in range(4):
        await mine.append(make_commit("a", version, 1))
        await other.append(make_commit("b", version, 1))
    assert len(mine.log.recent) == 2
    positions = [e.position for e in await fresh.read_all()]
    assert len(positions) == 8
    assert await _every_read(mine, positions) == await _every_read(fresh, positions)


@pytest.mark.anyio
async def test_memory_is_dropped_on_close(
    three: tuple[NatsBackend, NatsBackend, NatsBackend],
) -> None:
    mine, _, fresh = three
    await mine.append(make_commit("a", 0, 2))
    await mine.aclose()
    assert len(mine.log.recent) == 0
    assert await mine.read_all() == await fresh.read_all()  # reconnects and reads the server


def test_memory_keeps_its_own_copy_of_a_commits_events() -> None:
    recent = RecentCommits()
    commit = make_commit("a", 0, 2)
    events = list(commit.events)
    recent.add(7, replace(commit, events=events))
    events.clear()  # the caller reuses its list
    assert [(e.stream_id, e.version, e.position) for e in recent.get(7) or ()] == [
        ("a", 1, 7 * 1024),
        ("a", 2, 7 * 1024 + 1),
    ]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=30),
    max_commits=st.integers(min_value=1, max_value=6),
    max_bytes=st.integers(min_value=0, max_value=100),
)
def test_memory_keeps_the_newest_commits_within_its_bounds(
    sizes: list[int], max_commits: int, max_bytes: int
) -> None:
    recent = RecentCommits(max_commits=max_commits, max_bytes=max_bytes)
    for seq, size in enumerate(sizes, start=1):
        recent.add(seq, make_commit(f"s{seq}", 0, 1, data=b"x" * size if size else b"-"))
    kept = [seq for seq in range(1, len(sizes) + 1) if recent.get(seq) is not None]
    assert len(kept) <= max_commits
    assert sum(max(sizes[seq - 1], 1) for seq in kept) <= max_bytes
    assert kept == sorted(kept)
    if sizes and max(sizes[-1], 1) <= max_bytes:  # the newest is kept whenever it fits
        assert kept[-1] == len(sizes)
    for seq in kept:
        records = recent.get(seq)
        assert records is not None
        (event,) = records
        assert (event.stream_id, event.version, event.position) == (f"s{seq}", 1, seq * 1024)
