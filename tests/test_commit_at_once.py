"""A commit the backend can write at once is written without a suspension (and so without
the shielded scope an awaited commit needs); the rest are awaited as before.

On SQLite a sequential handler's commits are written in the event loop's thread at once
(``Backend.append_now``), at most eight in a row before one goes through the awaited path,
which lets other tasks run. A subclass that overrides ``append`` alone (to hook, count or
fail appends) keeps every commit on its ``append``.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Commit, appends_now
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.aggregates import events as ev

pytestmark = pytest.mark.anyio


class CountsAppends(SQLiteBackend):
    """Overrides ``append`` alone: every commit must still come through it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.appended: list[int] = []

    async def append(self, commit: Commit) -> int:
        position = await super().append(commit)
        if commit.events:
            self.appended.append(commit.events[-1].version)
        return position


class CountsBoth(CountsAppends):
    """Also counts the commits written at once (a subclass that overrides both keeps the
    commits written at once); ``appended`` holds the awaited ones."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.at_once: list[int] = []  # versions of the last event of each

    def append_now(self, commit: Commit) -> int | None:
        position = super().append_now(commit)
        if position is not None and commit.events:
            self.at_once.append(commit.events[-1].version)
        return position


class CountsCommits(ss.Interceptor):
    """A ``commit`` interceptor (as metrics are): it sees every commit the recorder makes."""

    def __init__(self) -> None:
        self.events: list[int] = []

    async def commit(self, info: ss.CommitInfo, call_next: Callable[[], Awaitable[Any]]) -> Any:
        result = await call_next()
        self.events.append(info.events)
        return result


def _engine(backend: SQLiteBackend, *interceptors: ss.Interceptor) -> ss.Engine:
    engine = ss.Engine(
        backend=backend, durability="each", poll_interval=0.01, interceptors=interceptors
    )

    @engine.step("at_once.writes")
    async def writes(ctx: ss.StepContext, n: int) -> int:
        for i in range(n):
            await ctx.set_state("i", i)
        return n

    return engine


async def test_a_sequential_handlers_commits_are_written_at_once_and_others_run_between(
    tmp_path: Path,
) -> None:
    backend = CountsBoth(str(tmp_path / "steps.db"))
    engine = _engine(backend)
    writes = 60
    ticks: list[int] = []  # how many commits were written at each tick of another task
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(len(backend.at_once) + len(backend.appended))
            await anyio.lowlevel.checkpoint()

    async with engine, anyio.create_task_group() as group:
        group.start_soon(ticker)
        handle = await engine.start("at_once.writes", {"n": writes})
        assert await handle.result(timeout=30) == writes
        done.set()
    events = await engine.events(handle.execution_id)
    await engine.aclose()
    states = [e.originator_version for e in events if isinstance(e, ev.StateSet)]
    assert len(states) == writes
    # every set_state is its own commit; most are written at once, the rest awaited
    assert sorted(backend.at_once + backend.appended) == sorted(
        {*backend.at_once, *backend.appended}
    ), "no commit is written twice"
    assert set(states) <= {*backend.at_once, *backend.appended}
    assert len(set(states) & set(backend.at_once)) >= writes // 2
    assert set(states) & set(backend.appended), "eight in a row at most, then one awaited"
    # another task runs between the handler's commits: never more than two passes of at
    # most nine commits between two of its ticks
    gaps = [after - before for before, after in itertools.pairwise(ticks)]
    assert max(gaps) <= 2 * 9


async def test_a_subclass_overriding_append_alone_sees_every_commit(tmp_path: Path) -> None:
    backend = CountsAppends(str(tmp_path / "steps.db"))
    assert not appends_now(backend)
    engine = _engine(backend)
    async with engine:
        handle = await engine.start("at_once.writes", {"n": 30})
        assert await handle.result(timeout=30) == 30
    events = await engine.events(handle.execution_id)
    await engine.aclose()
    states = [e.originator_version for e in events if isinstance(e, ev.StateSet)]
    assert len(states) == 30
    assert set(states) <= set(backend.appended)


async def test_with_a_commit_interceptor_commits_are_still_written_at_once(
    tmp_path: Path,
) -> None:
    backend = CountsBoth(str(tmp_path / "steps.db"))
    counted = CountsCommits()
    engine = _engine(backend, counted)
    async with engine:
        handle = await engine.start("at_once.writes", {"n": 30})
        assert await handle.result(timeout=30) == 30
    await engine.aclose()
    assert len(counted.events) >= 30, "the interceptor sees each set_state's commit"
    assert len(backend.at_once) >= 15, "and the write it wraps is made at once"


def test_which_backends_write_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "steps.db")
    assert appends_now(SQLiteBackend(path))
    assert appends_now(CountsBoth(path))
    assert not appends_now(CountsAppends(path))
    assert not appends_now(MemoryBackend())  # every commit passes the event loop
