"""One group commit of many commits on SQLite gives what the same commits give one by one on
the memory reference: the same outcomes (positions aside, a conflict for the same commits)
and the same log. Batches mix fresh streams, existing ones, stale versions, lease owners
right and wrong, a stream named twice (the one-by-one path) and commits without events, and
are written in the event loop's thread (a quick disk) or handed to the writer thread (after a
slow commit) alike."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepsource.adapters.contract import make_commit
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend, Commit, QueueUpdate
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.errors import VersionConflictError

STREAMS = ["a", "b", "c", "d"]


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Commit], list[Commit]]:
    """Setup commits (stream heads and leases), then one batch to write at once."""
    setup = [
        make_commit(s, 0, draw(st.integers(1, 3)), queue=QueueUpdate("enqueue", "step"))
        for s in STREAMS
        if draw(st.booleans())
    ]
    heads = {c.stream_id: len(c.events) for c in setup}
    batch = []
    for _ in range(draw(st.integers(2, 6))):
        stream = draw(st.sampled_from([*STREAMS, "fresh"]))
        expected = heads.get(stream, 0) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        owner = draw(st.sampled_from([None, None, "w1", "w2"]))
        count = draw(st.integers(0, 3))
        batch.append(make_commit(stream, max(expected, 0), count, lease_owner=owner))
    return setup, batch


async def _outcome(backend: Backend, commit: Commit) -> str:
    try:
        await backend.append(commit)
    except VersionConflictError:
        return "conflict"
    return "written"


async def _run(setup: list[Commit], batch: list[Commit], path: Path, where: str) -> None:
    reference = MemoryBackend()
    sqlite = SQLiteBackend(str(path / "batch.db"))
    for backend in (reference, sqlite):
        for commit in setup:
            await backend.append(commit)
        await backend.lease("w1", ["step"], now_ms=0, lease_ms=1000, limit=2)
    # written in the event loop's thread (a quick disk), or handed to the writer thread (as
    # after a slow commit)
    sqlite.log.batches_to_writer = 1 if where == "writer thread" else 0
    handed = 0
    in_writer = sqlite.connection.in_writer

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal handed
        handed += 1
        return await in_writer(*args, **kwargs)

    sqlite.connection.in_writer = counted  # type: ignore[method-assign]

    state = sqlite.connection.loop_state()
    got: dict[int, str] = {}

    async def one(index: int, commit: Commit) -> None:
        got[index] = await _outcome(sqlite, commit)

    before = sqlite.commits_written
    async with anyio.create_task_group() as group:
        state.flushing = True  # hold the writer until the whole batch is pending
        for index, commit in enumerate(batch):
            group.start_soon(one, index, commit)
        await anyio.wait_all_tasks_blocked()
        ids = [id(commit) for commit in batch]
        order = [ids.index(id(pending.commit)) for pending in state.pending]  # arrival order
        state.flushing = False
        state.pending[0].wake.set()
    assert sqlite.commits_written == before + 1, "the batch shared one transaction"
    assert handed == (1 if where == "writer thread" else 0)
    expected = {i: await _outcome(reference, batch[i]) for i in order}  # one after another
    assert got == expected
    mine = [(e.stream_id, e.version, e.topic, e.data) for e in await sqlite.read_all(0, 1000)]
    theirs = [(e.stream_id, e.version, e.topic, e.data) for e in await reference.read_all(0, 1000)]
    assert sorted(mine) == sorted(theirs)
    positions = [e.position for e in await sqlite.read_all(0, 1000)]
    assert positions == sorted(set(positions)), "positions strictly increase"
    await sqlite.aclose()


@pytest.mark.parametrize("where", ["event loop's thread", "writer thread"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=batches())
def test_a_batch_on_sqlite_is_the_reference_one_commit_after_another(
    case: tuple[list[Commit], list[Commit]], loop: str, where: str
) -> None:
    setup, batch = case
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(_run, setup, batch, Path(folder), where, backend=loop)
