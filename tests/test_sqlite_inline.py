"""A lone SQLite commit is written in the event loop's own thread, unless that could stall it.

When no other commit waits and the writer thread is idle, :class:`SQLiteLog` writes a lone
commit without handing it to the writer thread. It must still never stall the event loop on
another process's write lock, keep the busy timeout's wait, count its transaction, restore
the connection's busy timeout, and report conflicts as the thread path does.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from stepsource.adapters.contract import make_commit
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.sqlite import log as sqlite_log
from stepsource.errors import VersionConflictError

pytestmark = pytest.mark.anyio


async def test_a_lone_commit_waits_for_another_process_lock_without_stalling_the_loop(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "log.db"
    backend = SQLiteBackend(str(path), busy_timeout_ms=20_000)
    await backend.append(make_commit("s", 0))  # the file and the writer connection exist
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    released = anyio.Event()
    ticks = 0
    position: list[int] = []

    async def append() -> None:
        position.append(await backend.append(make_commit("s", 1)))

    async def ticker() -> None:
        nonlocal ticks
        while not released.is_set():
            ticks += 1
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(append)
        group.start_soon(ticker)
        while ticks < 5:  # the loop runs on while the append waits for the lock
            await anyio.sleep(0.01)
        assert position == [], "the append cannot have passed another process's lock"
        await anyio.to_thread.run_sync(other.execute, "COMMIT")
        released.set()
    other.close()
    assert position == [2]
    assert [e.version for e in await backend.read_stream("s")] == [1, 2]
    settings = await backend.connection_settings()
    assert settings["busy_timeout"] == 20_000
    await backend.aclose()


async def test_sequential_commits_count_one_transaction_each_and_conflicts_write_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.open()
    before = backend.commits_written
    for version in range(5):
        await backend.append(make_commit("s", version))
    assert backend.commits_written == before + 5
    with pytest.raises(VersionConflictError):
        await backend.append(make_commit("s", 2))  # stale: the stream is at version 5
    assert backend.commits_written == before + 5
    assert await backend.stream_version("s") == 5
    assert await backend.append(make_commit("s", 5)) == 6
    settings = await backend.connection_settings()
    assert settings["busy_timeout"] == backend.busy_timeout_ms
    await backend.aclose()


async def test_a_caller_committing_in_a_loop_lets_other_tasks_run_between_its_commits(
    tmp_path: Path, anyio_backend: str
) -> None:
    # a lone commit following a lone commit of its stream is written at once, without the
    # pass of the event loop that gathers a batch, but never more than 8 in a row: then the
    # caller yields, and another task runs before the caller's next pass at the latest (trio
    # runs a pass's tasks in random order: two passes of at most 9 commits between two ticks)
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.append(make_commit("s", 0))
    commits = 100
    seen_at_ticks: list[int] = []
    done = False

    async def ticker() -> None:
        while not done:
            seen_at_ticks.append(backend.commits_written)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        for version in range(1, commits + 1):
            await backend.append(make_commit("s", version))
        done = True
    assert backend.commits_written == commits + 1  # one transaction each
    gaps = [after - before for before, after in itertools.pairwise(seen_at_ticks)]
    assert max(gaps) <= 2 * 9
    await backend.aclose()


async def test_after_a_slow_write_batches_go_to_the_writer_thread_then_the_loop_tries_again(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a batch of concurrent commits is written in the event loop's thread while writes are
    # quick; after a slow one (every write counts as slow here) the next batches are handed
    # to the writer thread, so the loop runs other work during the disk's flush, and then one
    # is tried in the loop's thread again, which measures anew
    monkeypatch.setattr(sqlite_log, "SLOW_WRITE_SECONDS", 0.0)
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.append(make_commit("warm", 0))
    handed = 0
    in_writer = backend.connection.in_writer

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal handed
        handed += 1
        return await in_writer(*args, **kwargs)  # type: ignore[arg-type]

    backend.connection.in_writer = counted  # type: ignore[method-assign,assignment]
    versions = dict.fromkeys("abc", 0)
    where = []
    for _ in range(sqlite_log.SLOW_WRITE_BATCHES + 2):
        before, written = handed, backend.commits_written
        async with anyio.create_task_group() as group:  # three appends at once: one batch
            for stream in versions:
                group.start_soon(backend.append, make_commit(stream, versions[stream]))
        assert backend.commits_written == written + 1
        versions = {stream: version + 1 for stream, version in versions.items()}
        where.append("writer" if handed > before else "loop")
    batches = sqlite_log.SLOW_WRITE_BATCHES
    assert where == ["loop", *["writer"] * batches, "loop"]
    assert [await backend.stream_version(s) for s in versions] == [batches + 2] * 3
    await backend.aclose()
