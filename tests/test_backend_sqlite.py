"""The SQLite backend passes the backend contract, and what only SQLite has: WAL, pragmas,
several processes on one file (also racing compare-and-set), error translation, group commit,
the key-value store's table and its lazy purge."""

from __future__ import annotations

import sqlite3
import sys
import threading
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from stepsource.adapters.contract import BackendContract, check_log, make_commit
from stepsource.adapters.ports import Backend, QueueUpdate
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    UsageError,
    VersionConflictError,
)


class TestSQLiteBackend(BackendContract):
    def create_backend(self) -> Backend:
        return SQLiteBackend(str(self.tmp_path / f"{uuid.uuid4().hex}.db"))

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, SQLiteBackend)
        return SQLiteBackend(backend.path, synchronous=backend.synchronous)


@pytest.mark.anyio
@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1), ("NORMAL", 1)])
async def test_wal_and_synchronous_in_effect(
    tmp_path: Path, anyio_backend: str, synchronous: str, level: int
) -> None:
    path = tmp_path / "log.db"
    backend = SQLiteBackend(str(path), synchronous=synchronous, busy_timeout_ms=1234)
    await backend.append(make_commit("s", 0))
    settings = await backend.connection_settings()
    assert settings == {"journal_mode": "wal", "synchronous": level, "busy_timeout": 1234}
    await backend.aclose()
    with sqlite3.connect(path) as conn:  # WAL is a property of the file: it persists
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.anyio
async def test_group_commit_batches_concurrent_appends(tmp_path: Path, anyio_backend: str) -> None:
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.open()
    async with anyio.create_task_group() as group:
        for n in range(100):
            group.start_soon(backend.append, make_commit(f"s{n}", 0, 2))
    assert await backend.max_position() == 200
    assert 1 <= backend.commits_written < 100
    before = backend.commits_written
    for n in range(5):  # sequential awaited appends: one transaction each, no more
        await backend.append(make_commit("one", n))
    assert backend.commits_written == before + 5
    await backend.aclose()


@pytest.mark.anyio
async def test_conflict_in_a_batch_spares_the_others(tmp_path: Path, anyio_backend: str) -> None:
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.append(make_commit("taken", 0))
    results: dict[str, int | VersionConflictError] = {}

    async def attempt(name: str, stream: str, expected: int) -> None:
        try:
            results[name] = await backend.append(make_commit(stream, expected, 2))
        except VersionConflictError as exc:
            results[name] = exc

    before = backend.commits_written
    state = backend.connection.loop_state()
    async with anyio.create_task_group() as group:
        state.flushing = True  # an imaginary batch in flight: all three wait to be pending
        group.start_soon(attempt, "before", "a", 0)
        group.start_soon(attempt, "stale", "taken", 0)
        group.start_soon(attempt, "after", "b", 0)
        await anyio.wait_all_tasks_blocked()
        state.flushing = False  # that batch is written: the first waiting commit leads
        state.pending[0].wake.set()
    assert backend.commits_written == before + 1  # all three shared one transaction
    assert isinstance(results["stale"], VersionConflictError)
    assert results["stale"].execution_id == "taken"
    assert {results["before"], results["after"]} == {3, 5}  # the refusal left no gap
    check_log(await backend.read_all(), commit_size=2)
    await backend.aclose()


@pytest.mark.anyio
async def test_cancelled_waiter_is_not_written(tmp_path: Path, anyio_backend: str) -> None:
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.open()
    state = backend.connection.loop_state()
    state.flushing = True  # an imaginary batch in flight
    async with anyio.create_task_group() as group:
        group.start_soon(backend.append, make_commit("s", 0))
        await anyio.wait_all_tasks_blocked()
        assert len(state.pending) == 1
        group.cancel_scope.cancel()
    state.flushing = False
    assert state.pending == []
    assert await backend.stream_version("s") == 0
    assert await backend.append(make_commit("s", 0)) == 1
    await backend.aclose()


@pytest.mark.anyio
async def test_one_object_shared_by_threads(tmp_path: Path, anyio_backend: str) -> None:
    backend = SQLiteBackend(str(tmp_path / "log.db"))

    def write(thread: int) -> None:
        async def run() -> None:
            for n in range(20):
                await backend.append(make_commit(f"t{thread}", n * 2, 2))

        anyio.run(run, backend=anyio_backend)

    async with anyio.create_task_group() as group:
        for thread in range(3):
            group.start_soon(anyio.to_thread.run_sync, write, thread)
    log = await backend.read_all(0, 1000)
    assert len(log) == 120
    check_log(log, commit_size=2)
    await backend.aclose()


@pytest.mark.anyio
async def test_data_survives_reopening_the_file(tmp_path: Path, anyio_backend: str) -> None:
    first = SQLiteBackend(str(tmp_path / "log.db"))
    await first.append(make_commit("s", 0, 3))
    await first.aclose()
    second = SQLiteBackend(str(tmp_path / "log.db"))
    assert await second.stream_version("s") == 3
    assert await second.append(make_commit("t", 0)) == 4
    await second.aclose()


@pytest.mark.anyio
async def test_not_a_database_is_corrupt(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    backend = SQLiteBackend(str(path))
    with pytest.raises(CorruptLogError, match=r"notes\.db"):
        await backend.open()
    with pytest.raises(CorruptLogError):
        await backend.read_stream("s")
    with pytest.raises(CorruptLogError):
        await backend.append(make_commit("s", 0))
    with pytest.raises(CorruptLogError):
        await backend.kv_get("k", 0)
    with pytest.raises(CorruptLogError):
        await backend.kv_compare_and_set("k", None, b"v", 0)


@pytest.mark.anyio
async def test_a_gap_in_versions_is_not_served(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "log.db"
    backend = SQLiteBackend(str(path))
    await backend.append(make_commit("s", 0, 4))
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE stream_id = 's' AND version = 2")
    conn.close()
    with pytest.raises(CorruptLogError, match="gap") as caught:
        await backend.read_stream("s")
    assert caught.value.execution_id == "s"
    assert [e.version for e in await backend.read_stream("s", 3)] == [3, 4]
    await backend.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["missing-dir/log.db", "."])
async def test_unopenable_path_is_unavailable(
    tmp_path: Path, anyio_backend: str, where: str
) -> None:
    path = str(tmp_path / where)
    backend = SQLiteBackend(path)
    with pytest.raises(BackendUnavailableError, match="directory exists") as caught:
        await backend.open()
    assert path in str(caught.value)
    with pytest.raises(BackendUnavailableError):
        await backend.append(make_commit("s", 0))


@pytest.mark.parametrize(
    "kwargs",
    [{"synchronous": "off"}, {"busy_timeout_ms": -1}, {"busy_timeout_ms": 2**40}],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        SQLiteBackend(str(tmp_path / "log.db"), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_memory_paths_are_refused(path: str) -> None:
    with pytest.raises(UsageError, match="memory://"):
        SQLiteBackend(path)


_WORKER = """
import sys, anyio
from stepsource.adapters.contract import make_commit
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.errors import VersionConflictError

path, name, commits = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    backend = SQLiteBackend(path)
    for n in range(commits):
        await backend.append(make_commit(name, n * 3, 3))
        while True:  # a stream both processes write: optimistic retry
            version = await backend.stream_version("shared")
            try:
                await backend.append(make_commit("shared", version, 1, data=name.encode()))
                break
            except VersionConflictError:
                pass
    while leases := await backend.lease(name, ["step"], 0, 10**9, 1):
        await backend.append(make_commit(leases[0].stream_id, 0, lease_owner=name))
        print(leases[0].stream_id, flush=True)
    await backend.aclose()

anyio.run(main)
"""


@pytest.mark.anyio
async def test_two_processes_share_one_file(tmp_path: Path, anyio_backend: str) -> None:
    path = str(tmp_path / "shared.db")
    backend = SQLiteBackend(path)
    for n in range(40):
        commit = make_commit(f"job-{n}", 0, 0, queue=QueueUpdate("enqueue", step_id="step"))
        await backend.append(commit)
    commits = 60
    leased: dict[str, list[str]] = {}

    async def run(name: str) -> None:
        command = [sys.executable, "-c", _WORKER, path, name, str(commits)]
        done = await anyio.run_process(command, cwd=tmp_path, check=False)
        assert done.returncode == 0, done.stderr.decode()
        leased[name] = done.stdout.decode().split()

    async with anyio.create_task_group() as group:
        group.start_soon(run, "p1")
        group.start_soon(run, "p2")
    assert set(leased["p1"]).isdisjoint(leased["p2"])  # one stream never leased twice
    assert sorted(leased["p1"] + leased["p2"]) == sorted(f"job-{n}" for n in range(40))
    log = await backend.read_all(0, 10_000)
    check_log(log)
    for name in ("p1", "p2"):
        assert await backend.stream_version(name) == commits * 3
    shared = await backend.read_stream("shared")
    assert sorted(e.data for e in shared) == sorted([b"p1", b"p2"] * commits)
    await backend.aclose()


_FIRST_SCHEMA = (  # the tables of the first release, before inboxes and definitions
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY AUTOINCREMENT, stream_id TEXT NOT NULL,
        version INTEGER NOT NULL, topic TEXT NOT NULL, data BLOB NOT NULL,
        UNIQUE (stream_id, version))""",
    """CREATE TABLE queue (
        stream_id TEXT PRIMARY KEY, step_id TEXT NOT NULL, priority INTEGER NOT NULL,
        due_ms INTEGER NOT NULL, lease_owner TEXT, lease_expires_ms INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX queue_by_step ON queue (step_id, due_ms)",
    """CREATE TABLE snapshots (
        stream_id TEXT PRIMARY KEY, version INTEGER NOT NULL, topic TEXT NOT NULL,
        data BLOB NOT NULL)""",
    "INSERT INTO events (stream_id, version, topic, data) VALUES ('s', 1, 't', x'00')",
    "INSERT INTO queue (stream_id, step_id, priority, due_ms) VALUES ('s', 'step', 0, 5000)",
)


@pytest.mark.anyio
async def test_a_file_of_the_first_schema_gains_the_new_tables(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for sql in _FIRST_SCHEMA:
            conn.execute(sql)
    conn.close()
    backend = SQLiteBackend(str(path))
    assert [e.data for e in await backend.read_stream("s")] == [b"\x00"]
    item = await backend.post("s", "signal", "go", b"{}", 100)
    assert [(i.id, i.name) for i in await backend.inbox("s")] == [(item, "go")]
    assert await backend.next_due_ms(["step"]) == 100  # the post woke the old queue row
    await backend.publish_definition("step", "1", b"{}")
    assert await backend.published_definition("step") == ("1", b"{}")
    assert len(await backend.lease("w", ["step"], 100, 10, 1)) == 1
    await backend.append(make_commit("s", 1, consumed=[item], lease_owner="w"))
    assert await backend.inbox("s") == []
    entry = await backend.kv_put("k", b"v", 100, ttl_ms=10)
    assert await backend.kv_get("k", 109) == entry
    await backend.aclose()
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"events", "queue", "snapshots", "inbox", "inbox_by_stream", "definitions"} <= tables
    assert {"kv", "kv_by_expiry", "kv_sequence"} <= tables


_KV_WORKER = """
import sys, anyio
from stepsource.adapters.contract import kv_increment
from stepsource.adapters.sqlite import SQLiteBackend

path, attempts, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def main():
    backend = SQLiteBackend(path)
    await backend.open()
    print("ready", flush=True)
    sys.stdin.readline()  # start together, so that the two really race
    won = 0
    for _ in range(attempts):
        if await kv_increment(backend, "quota", 0) is not None:
            won += 1
    await backend.aclose()
    print(won, flush=True)

anyio.run(main, backend=loop)
"""


@pytest.mark.anyio
async def test_two_processes_race_compare_and_set(tmp_path: Path, anyio_backend: str) -> None:
    """A quota counter: each process tries N increments without retrying; whatever the
    interleaving, the final count is the number of increments that reported success."""
    path = str(tmp_path / "quota.db")
    attempts = 150
    command = [sys.executable, "-c", _KV_WORKER, path, str(attempts), anyio_backend]
    won: list[int] = []
    async with (
        await anyio.open_process(command, cwd=tmp_path) as first,
        await anyio.open_process(command, cwd=tmp_path) as second,
    ):
        processes = (first, second)
        lines = []  # whole lines: an unbuffered child writes "ready" and "\n" apart
        for process in processes:
            assert process.stdout is not None
            lines.append(BufferedByteReceiveStream(process.stdout))
        for line in lines:
            assert await line.receive_until(b"\n", 100) == b"ready"
        for process in processes:
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
        for line in lines:
            won.append(int(await line.receive_until(b"\n", 100)))
        for process in processes:
            assert await process.wait() == 0
    backend = SQLiteBackend(path)
    final = await backend.kv_get("quota", 0)
    assert final is not None
    assert int(final.data) == sum(won)
    assert 1 <= sum(won) <= 2 * attempts
    assert won[0] > 0 or won[1] > 0
    await backend.aclose()


@pytest.mark.anyio
async def test_kv_writes_take_the_one_writer(tmp_path: Path, anyio_backend: str) -> None:
    """Key-value writes queue on the backend's one writer thread like every other write: no
    second writer connection competes with group commit."""
    backend = SQLiteBackend(str(tmp_path / "log.db"))
    await backend.open()
    busy = threading.Event()
    written: list[object] = []
    async with anyio.create_task_group() as group:
        group.start_soon(backend.connection.in_writer, busy.wait)  # the writer thread is busy
        await anyio.wait_all_tasks_blocked()
        group.start_soon(lambda: backend.append(make_commit("s", 0)))
        group.start_soon(lambda: backend.kv_put("k", b"v", 0))
        group.start_soon(lambda: backend.kv_compare_and_set("c", None, b"v", 0))
        await anyio.wait_all_tasks_blocked()
        written.append(await backend.kv_get("k", 0))
        written.append(await backend.kv_get("c", 0))
        busy.set()
    assert written == [None, None]
    assert await backend.kv_get("k", 0) is not None
    assert await backend.kv_get("c", 0) is not None
    assert await backend.stream_version("s") == 1
    await backend.aclose()


@pytest.mark.anyio
async def test_kv_expired_rows_are_purged_and_refusals_write_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "log.db"
    backend = SQLiteBackend(str(path))
    for n in range(100):
        await backend.kv_put(f"old-{n}", b"x", 0, ttl_ms=10)
    kept = await backend.kv_put("kept", b"k", 0, ttl_ms=1000)
    watcher = sqlite3.connect(path)

    def rows() -> set[str]:
        return {row[0] for row in watcher.execute("SELECT key FROM kv")}

    def data_version() -> int:  # changes whenever another connection commits a change
        return int(watcher.execute("PRAGMA data_version").fetchone()[0])

    before = data_version()
    assert await backend.kv_compare_and_set("kept", kept.revision + 1, b"no", 50) is None
    assert await backend.kv_compare_and_set("old-1", 10**9, b"no", 50) is None
    assert data_version() == before  # refused: not even a purge was written
    assert len(rows()) == 101  # expired rows stay until a write purges them...
    await backend.kv_put("new", b"n", 50)
    await backend.kv_delete("nothing", 50)
    assert rows() == {"kept", "new"}  # ... a few dozen per write
    assert await backend.kv_get("kept", 50) == kept
    watcher.close()
    await backend.aclose()
