"""The NATS JetStream backend passes the backend contract on a real single-node nats-server,
and what only NATS has: positions from stream sequences, the server's max_payload, lost
acknowledgements, auth, URLs, and the refusal of trio (nats-py is asyncio-only)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from stepsource.adapters.contract import (
    BackendContract,
    check_log,
    enqueue,
    make_commit,
)
from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.wire import NatsOptions, Transient, decode_token, encode_token
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    NewEvent,
    RecordedEvent,
    Snapshot,
)
from stepsource.adapters.urls import open_backend
from stepsource.errors import (
    BackendUnavailableError,
    LimitExceededError,
    StepsourceError,
    UsageError,
    VersionConflictError,
)
from stepsource.testing.nats_server import NatsServer, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only; trio is refused (see below)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


def new_backend(server: NatsServer, **changes: Any) -> NatsBackend:
    """A backend on a stream name of its own: a fresh, empty store on the shared server."""
    options = NatsOptions((f"127.0.0.1:{server.port}",), stream=f"T{uuid.uuid4().hex[:16]}")
    return NatsBackend(replace(options, **changes))


class _DensePositions(Backend):
    """Renumbers a backend's positions 1, 2, 3 ... in log order, as the memory reference
    numbers them, so :class:`BackendComparison` can compare every answer exactly."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.max_commit_bytes = inner.max_commit_bytes

    async def _positions(self) -> list[int]:
        return [event.position for event in await self.inner.read_all(0, 1_000_000)]

    async def _renumber(self, events: list[RecordedEvent]) -> list[RecordedEvent]:
        dense = {position: n + 1 for n, position in enumerate(await self._positions())}
        return [event._replace(position=dense[event.position]) for event in events]

    async def open(self) -> None:
        await self.inner.open()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def append(self, commit: Commit) -> int:
        position = await self.inner.append(commit)
        return 0 if position == 0 else (await self._positions()).index(position) + 1

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        return await self._renumber(
            await self.inner.read_stream(stream_id, from_version, to_version)
        )

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        positions = await self._positions()
        real = 0 if after_position <= 0 else positions[min(after_position, len(positions)) - 1]
        return await self._renumber(await self.inner.read_all(real, limit))

    async def stream_version(self, stream_id: str) -> int:
        return await self.inner.stream_version(stream_id)

    async def max_position(self) -> int:
        return len(await self._positions())

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        return await self.inner.lease(worker_id, step_ids, now_ms, lease_ms, limit)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        return await self.inner.renew(worker_id, stream_ids, now_ms, lease_ms)

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self.inner.release(worker_id, stream_id, due_ms)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        return await self.inner.next_due_ms(step_ids)

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        return await self.inner.post(stream_id, kind, name, data, now_ms)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        return await self.inner.inbox(stream_id, after_id, limit)

    async def reserve_inbox_ids(self, above: int) -> None:
        await self.inner.reserve_inbox_ids(above)

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        await self.inner.publish_definition(step_id, version, data)

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        return await self.inner.published_definition(step_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.save_snapshot(snapshot)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        return await self.inner.latest_snapshot(stream_id, max_version)

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        return await self.inner.kv_get(key, now_ms)

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        return await self.inner.kv_put(key, data, now_ms, ttl_ms)

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        return await self.inner.kv_compare_and_set(key, expected_revision, data, now_ms, ttl_ms)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        await self.inner.kv_delete(key, now_ms)

    async def kv_scan(
        self, now_ms: int, cursor: str = "", limit: int = 1000
    ) -> tuple[list[KVEntry], str]:
        return await self.inner.kv_scan(now_ms, cursor, limit)


class TestNatsBackend(BackendContract):
    server: NatsServer

    @pytest.fixture(autouse=True)
    def _use_server(self, nats_server: NatsServer) -> None:
        self.server = nats_server

    def create_backend(self) -> Backend:
        return new_backend(self.server)

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, NatsBackend)
        return NatsBackend(backend.options)

    # The contract pins positions 1, 2, 3 in two tests; NATS positions are sequence * 1024 +
    # index (strictly increasing, with gaps). The same checks, positions taken relatively:
    @pytest.mark.anyio
    async def test_wrong_expected_version_conflicts_and_stores_nothing(
        self, backend: Backend
    ) -> None:
        first = await backend.append(make_commit("s", 0, 2))
        for expected in (0, 1, 3, 7):
            with pytest.raises(VersionConflictError) as caught:
                await backend.append(make_commit("s", expected, 3))
            assert caught.value.execution_id == "s"
            assert f"version {expected}" in str(caught.value)
            assert "at version 2" in str(caught.value)
        assert [e.version for e in await backend.read_stream("s")] == [1, 2]
        assert await backend.max_position() == first
        assert len(await backend.read_all()) == 2
        assert await backend.append(make_commit("s", 2, 1)) > first

    @pytest.mark.anyio
    async def test_usable_after_aclose(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, 2, queue=enqueue("step")))
        await backend.aclose()
        assert [e.version for e in await backend.read_stream("s")] == [1, 2]
        await backend.aclose()
        await backend.aclose()
        third = await backend.append(make_commit("s", 2))
        await backend.aclose()
        assert len(await backend.lease("w", ["step"], 0, 10, 1)) == 1
        assert await backend.max_position() == third
        assert [e.position for e in await backend.read_all()][-1] == third
        item = await backend.post("s", "signal", "x", b"y", 1)
        await backend.aclose()
        assert [i.id for i in await backend.inbox("s")] == [item]

    comparison_examples = 20  # each example starts fresh streams on a real server
    comparison_steps = 25

    def create_compared_backend(self) -> Backend:
        return _DensePositions(new_backend(self.server))


# -- what only NATS has ---------------------------------------------------------------------
@pytest.fixture
async def backend(nats_server: NatsServer, anyio_backend: str) -> AsyncIterator[NatsBackend]:
    store = new_backend(nats_server)
    await store.open()
    yield store
    await store.aclose()


@pytest.mark.anyio
async def test_positions_are_sequence_times_1024_plus_index(backend: NatsBackend) -> None:
    first = await backend.append(make_commit("a", 0, 3))
    second = await backend.append(make_commit("b", 0, 1))
    assert first == 1 * 1024 + 2
    assert second == 2 * 1024
    assert [e.position for e in await backend.read_all()] == [1024, 1025, 1026, 2048]
    assert await backend.read_all(1025) == (await backend.read_all())[2:]
    assert await backend.max_position() == 2048


@pytest.mark.anyio
async def test_more_than_1024_events_in_one_commit_are_refused(backend: NatsBackend) -> None:
    with pytest.raises(LimitExceededError, match="1024"):
        await backend.append(make_commit("s", 0, 1025, data=b"x"))
    assert await backend.append(make_commit("s", 0, 1024, data=b"x")) == 1024 + 1023
    assert len(await backend.read_stream("s")) == 1024


@pytest.mark.anyio
async def test_max_commit_bytes_follows_the_servers_max_payload(
    tmp_path: Path, anyio_backend: str
) -> None:
    with NatsServer(tmp_path / "small", max_payload=64 * 1024) as server:
        backend = new_backend(server)
        await backend.open()
        assert 32 * 1024 <= backend.max_commit_bytes < 64 * 1024
        too_big = b"x" * (backend.max_commit_bytes + 1)
        with pytest.raises(LimitExceededError):
            await backend.append(make_commit("s", 0, data=too_big))
        with pytest.raises(LimitExceededError):
            await backend.post("s", "signal", "big", too_big, 0)
        # within max_commit_bytes, but the framing of 1000 events pushes it over max_payload
        events = [NewEvent("s", v, "t" * 40, b"y" * 30) for v in range(1, 1001)]
        with pytest.raises(LimitExceededError) as caught:
            await backend.append(Commit("s", 0, events))
        assert caught.value.execution_id == "s"
        assert await backend.append(make_commit("s", 0, data=b"fits")) == 1024  # still usable
        await backend.aclose()


@pytest.mark.anyio
async def test_a_lost_ack_is_retried_without_a_duplicate(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_publish = backend.js.publish
    lost: list[int] = []

    async def publish_then_lose_the_ack(
        subject: str, payload: bytes, headers: dict[str, str], *, retry: bool = True
    ) -> int:
        seq = await real_publish(subject, payload, headers, retry=retry)
        if ".ev." in subject and not lost:
            lost.append(seq)
            raise Transient("the ack was lost")
        return seq

    monkeypatch.setattr(backend.js, "publish", publish_then_lose_the_ack)
    position = await backend.append(make_commit("s", 0, 2))
    assert lost  # the first publish was stored, its ack dropped, and the retry refused
    assert position == lost[0] * 1024 + 1
    assert [e.version for e in await backend.read_all()] == [1, 2]
    with pytest.raises(VersionConflictError):  # a real conflict is still one
        await backend.append(make_commit("s", 0, 1))


@pytest.mark.anyio
async def test_odd_execution_ids_get_subjects_of_their_own(backend: NatsBackend) -> None:
    ids = ["a.b", "a b", "*", ">", "é", "=x", "", "x" * 200, "a-b_C9"]
    for n, stream in enumerate(ids):
        assert decode_token(encode_token(stream)) == stream
        await backend.append(make_commit(stream, 0, n + 1))
        await backend.post(stream, "signal", "n", b"", 0)
    for n, stream in enumerate(ids):
        assert await backend.stream_version(stream) == n + 1
        assert {e.stream_id for e in await backend.read_stream(stream)} == {stream}
        assert [i.stream_id for i in await backend.inbox(stream)] == [stream]
    check_log(await backend.read_all())
    assert len({encode_token(stream) for stream in ids}) == len(ids)


@pytest.mark.anyio
async def test_two_objects_share_the_queue_atomically(
    nats_server: NatsServer, anyio_backend: str
) -> None:
    first = new_backend(nats_server)
    second = NatsBackend(first.options)
    for n in range(30):
        await first.append(make_commit(f"job-{n}", 0, queue=enqueue("step", n)))
    taken: dict[str, list[str]] = {"w1": [], "w2": []}

    async def worker(store: NatsBackend, name: str) -> None:
        while leases := await store.lease(name, ["step"], 1000, 10**6, 3):
            taken[name].extend(lease.stream_id for lease in leases)

    async with anyio.create_task_group() as group:
        group.start_soon(worker, first, "w1")
        group.start_soon(worker, second, "w2")
    assert set(taken["w1"]).isdisjoint(taken["w2"])
    assert sorted(taken["w1"] + taken["w2"]) == sorted(f"job-{n}" for n in range(30))
    await first.aclose()
    await second.aclose()


# -- the lease check of a commit: the queue mirror, caught up after the commit began ----------
async def _leased_to(store: NatsBackend, worker: str, streams: Sequence[str]) -> None:
    for stream in streams:
        await store.append(make_commit(stream, 0, queue=enqueue("step")))
    leases = await store.lease(worker, ["step"], 0, 100, len(streams))
    assert sorted(lease.stream_id for lease in leases) == sorted(streams)


@pytest.mark.anyio
async def test_a_takeover_by_another_process_refuses_the_zombie(
    nats_server: NatsServer, anyio_backend: str
) -> None:
    """Another backend object (another process) leases executions after their leases
    expired and writes nothing yet: the zombie's next commits are refused even though its
    own mirror last saw its own lease and its own commits, while the executions it still
    holds go on; its commits run at once, sharing catch-ups of the mirror."""
    zombie = new_backend(nats_server)
    taker = NatsBackend(zombie.options)
    streams = [f"s{n}" for n in range(20)]
    await _leased_to(zombie, "w1", streams)
    for stream in streams:  # the holder writes while it holds: its mirror shows it holds
        await zombie.append(make_commit(stream, 1, lease_owner="w1"))
    taken = await taker.lease("w2", ["step"], 101, 100, 10)  # w1's leases expired at 100
    assert len(taken) == 10
    taken_ids = {lease.stream_id for lease in taken}
    outcomes: dict[str, str] = {}

    async def commit(stream: str) -> None:
        try:
            await zombie.append(make_commit(stream, 2, lease_owner="w1"))
            outcomes[stream] = "written"
        except VersionConflictError:
            outcomes[stream] = "refused"

    async with anyio.create_task_group() as group:
        for stream in streams:
            group.start_soon(commit, stream)
    assert {s for s, outcome in outcomes.items() if outcome == "refused"} == taken_ids
    for stream in streams:
        assert await taker.stream_version(stream) == (2 if stream in taken_ids else 3)
        if stream in taken_ids:  # the new holder's first append goes through
            await taker.append(make_commit(stream, 2, lease_owner="w2"))
    await zombie.aclose()
    await taker.aclose()


@pytest.mark.anyio
async def test_a_lease_check_never_answers_from_before_its_commit_began(
    nats_server: NatsServer, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up of the mirror already in flight when a commit begins (its probe answered
    before a takeover) does not answer that commit's lease check: the commit waits for a
    catch-up of its own, which sees the takeover. The checks answer from the mirror as it
    is when they resume, so the earlier commit, held back until then, sees it too."""
    zombie = new_backend(nats_server)
    taker = NatsBackend(zombie.options)
    await _leased_to(zombie, "w1", ["early", "late"])
    real = zombie.queue.catch_up
    answered, release = anyio.Event(), anyio.Event()
    calls = 0

    async def slow_first_catch_up() -> bool:
        nonlocal calls
        calls += 1
        current = await real()
        if calls == 1:  # the server answered; the answer is held back
            answered.set()
            await release.wait()
        return current

    monkeypatch.setattr(zombie.queue, "catch_up", slow_first_catch_up)
    refused: list[str] = []

    async def early() -> None:
        with pytest.raises(VersionConflictError):
            await zombie.append(make_commit("early", 1, lease_owner="w1"))
        refused.append("early")

    async with anyio.create_task_group() as group:
        group.start_soon(early)
        await answered.wait()  # the probe of the first catch-up saw w1 holding both
        assert [t.stream_id for t in await taker.lease("w2", ["step"], 101, 100, 5)] == [
            "early",
            "late",
        ]
        with pytest.raises(VersionConflictError):  # began after the takeover
            await zombie.append(make_commit("late", 1, lease_owner="w1"))
        release.set()
    assert refused == ["early"]
    assert calls == 2
    assert [await zombie.stream_version(s) for s in ("early", "late")] == [1, 1]
    await zombie.aclose()
    await taker.aclose()


@pytest.mark.anyio
async def test_a_failed_catch_up_falls_back_to_reading_the_row(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leased_to(backend, "w1", ["s"])

    async def unconfirmed() -> bool:
        return False

    async def broken() -> bool:
        raise Transient("no answer")

    for catch_up in (unconfirmed, broken):
        monkeypatch.setattr(backend.queue, "catch_up", catch_up)
        version = await backend.stream_version("s")
        await backend.append(make_commit("s", version, lease_owner="w1"))
        with pytest.raises(VersionConflictError):
            await backend.append(make_commit("s", version + 1, lease_owner="w2"))
    assert await backend.stream_version("s") == 3


@pytest.mark.anyio
async def test_a_commit_cancelled_during_its_lease_check_sends_nothing(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _leased_to(backend, "w1", ["s"])
    real = backend.queue.catch_up
    probing, release = anyio.Event(), anyio.Event()

    async def held_catch_up() -> bool:
        current = await real()
        probing.set()
        await release.wait()
        return current

    monkeypatch.setattr(backend.queue, "catch_up", held_catch_up)
    async with anyio.create_task_group() as group:
        group.start_soon(backend.append, make_commit("s", 1, lease_owner="w1"))
        await probing.wait()
        group.cancel_scope.cancel()  # the check passed at the server, the answer is held
    release.set()
    monkeypatch.setattr(backend.queue, "catch_up", real)
    await backend.append(make_commit("s", 1, lease_owner="w1"))  # version 2 was never sent
    assert [e.version for e in await backend.read_stream("s")] == [1, 2]


@pytest.mark.anyio
async def test_a_lost_ack_of_a_leased_commit_is_found_again(
    backend: NatsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first publish of a leased commit goes out with its lease check; when its ack is
    lost the commit is published again, as any other, and is found stored once."""
    await _leased_to(backend, "w1", ["s"])
    real = backend.connection.send
    lost: list[str] = []

    async def send_and_lose_the_ack(
        subject: str, payload: bytes, headers: dict[str, str], answer: Any
    ) -> None:
        await real(subject, payload, headers, answer)
        if not lost:
            lost.append(subject)
            answer.set_exception(TimeoutError())

    monkeypatch.setattr(backend.connection, "send", send_and_lose_the_ack)
    position = await backend.append(make_commit("s", 1, 2, lease_owner="w1"))
    assert lost
    assert [e.version for e in await backend.read_all()] == [1, 2, 3]
    assert (await backend.read_all())[-1].position == position


@pytest.mark.anyio
async def test_aclose_with_lease_checks_in_flight(backend: NatsBackend) -> None:
    await _leased_to(backend, "w1", ["a", "b"])
    async with anyio.create_task_group() as group:
        for stream in ("a", "b"):
            group.start_soon(backend.append, make_commit(stream, 1, lease_owner="w1"))
        await anyio.lowlevel.checkpoint()
        await backend.aclose()  # the commits read their rows instead, on a new connection
    assert [await backend.stream_version(s) for s in ("a", "b")] == [2, 2]


@pytest.mark.anyio
async def test_a_stream_name_taken_by_something_else_is_refused(
    nats_server: NatsServer, anyio_backend: str
) -> None:
    owner = new_backend(nats_server)
    await owner.open()  # its inbox stream is named STREAM_inbox
    clash = NatsBackend(replace(owner.options, stream=f"{owner.options.stream}_inbox"))
    with pytest.raises(UsageError, match="subjects") as caught:
        await clash.open()
    assert "another ?stream= name" in str(caught.value)
    replicated = NatsBackend(replace(owner.options, stream="R3", replicas=3))
    with pytest.raises(UsageError, match="not clustered"):
        await replicated.open()
    await owner.aclose()


# -- trio -----------------------------------------------------------------------------------
def test_trio_is_refused_with_a_clear_error(nats_server: NatsServer) -> None:
    backend = new_backend(nats_server)

    async def main() -> None:
        with pytest.raises(UsageError, match="asyncio only") as caught:
            await backend.open()
        assert "trio" in str(caught.value)
        with pytest.raises(UsageError, match="asyncio only"):
            await backend.append(make_commit("s", 0))
        with pytest.raises(UsageError, match="asyncio only"):
            await backend.read_all()

    anyio.run(main, backend="trio")


# -- auth -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("auth"), user="app", password="s3cr3t") as server:
        yield server


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("token"), token="t0k3n") as server:
        yield server


async def _round_trip(url: str) -> None:
    backend = open_backend(url)
    try:
        assert await backend.append(make_commit("s", 0, 2)) == 1025
        assert [e.version for e in await backend.read_stream("s")] == [1, 2]
    finally:
        await backend.aclose()


async def _refused(url: str, server: NatsServer) -> BackendUnavailableError:
    backend = open_backend(url)
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.open()
    assert isinstance(caught.value, StepsourceError)
    message = str(caught.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "Authorization" in message
    assert "credentials" in message
    for secret in ("s3cr3t", "t0k3n", "wrong"):
        assert secret not in message
    with pytest.raises(BackendUnavailableError):  # every call, not only open()
        await backend.append(make_commit("s", 0))
    return caught.value


@pytest.mark.anyio
async def test_user_and_password(password_server: NatsServer, anyio_backend: str) -> None:
    where = f"127.0.0.1:{password_server.port}"
    await _refused(f"nats://{where}?stream=A", password_server)
    await _refused(f"nats://app:wrong@{where}?stream=A", password_server)
    await _round_trip(f"nats://app:s3cr3t@{where}?stream=A")


@pytest.mark.anyio
async def test_token(token_server: NatsServer, anyio_backend: str) -> None:
    where = f"127.0.0.1:{token_server.port}"
    await _refused(f"nats://{where}?stream=B", token_server)
    await _refused(f"nats://{where}?stream=B&token=wrong", token_server)
    await _round_trip(f"nats://{where}?stream=B&token=t0k3n")


@pytest.mark.anyio
async def test_no_server_is_unavailable(anyio_backend: str) -> None:
    port = free_port()
    backend = open_backend(f"nats://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}") as caught:
        await backend.read_all()
    assert "nats-server" in str(caught.value)


# -- URLs -----------------------------------------------------------------------------------
def test_nats_urls() -> None:
    backend = open_backend(
        "nats://u:p%40ss@127.0.0.1:4222,127.0.0.1:4223?stream=Tenant_1&replicas=3"
    )
    assert isinstance(backend, NatsBackend)
    options = backend.options
    assert options.servers == ("127.0.0.1:4222", "127.0.0.1:4223")
    assert (options.stream, options.replicas, options.user, options.password) == (
        "Tenant_1",
        3,
        "u",
        "p@ss",
    )
    assert "p@ss" not in repr(backend)
    assert "p@ss" not in repr(options)
    default = open_backend("nats://localhost")
    assert isinstance(default, NatsBackend)
    assert default.options.servers == ("localhost:4222",)
    assert default.options.stream == "STEPSOURCE"
    token = open_backend("NATS://[::1]:5000?token=abc&creds=/x.creds&tls_ca=/ca.pem")
    assert isinstance(token, NatsBackend)
    assert token.options.servers == ("[::1]:5000",)
    assert (token.options.token, token.options.creds, token.options.tls_ca) == (
        "abc",
        "/x.creds",
        "/ca.pem",
    )


@pytest.mark.parametrize(
    "url",
    [
        "nats://",
        "nats://127.0.0.1:4222/path",
        "nats://127.0.0.1:notaport",
        "nats://127.0.0.1:99999",
        "nats://127.0.0.1:4222,",
        "nats://127.0.0.1?stream=bad.name",
        "nats://127.0.0.1?stream=",
        "nats://127.0.0.1?replicas=7",
        "nats://127.0.0.1?replicas=three",
        "nats://127.0.0.1?stream=a&stream=b",
        "nats://127.0.0.1?colour=blue",
        "nats://u:p@127.0.0.1?token=t",
        "nats://127.0.0.1?tls_cert=/c.pem",
        "nats://:secret@127.0.0.1",
        "nats://[::1:4222",
    ],
)
def test_malformed_nats_urls_are_refused(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_backend(url)
    message = str(caught.value)
    assert "nats://[user:password@]host" in message
    assert "secret" not in message


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_creds_without_the_nkeys_package_is_a_usage_error(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py signs a creds= connection with nkeys, which the nats extra does not bring:
    its ModuleNotFoundError escaped as a traceback (the CLI exited 1)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nkeys" else real(name, *a)
    )
    backend = open_backend(f"{nats_server.url}?stream=CREDS&creds=/tmp/user.creds")
    with pytest.raises(UsageError, match="creds= option needs the nkeys package"):
        await backend.open()
    await backend.aclose()
