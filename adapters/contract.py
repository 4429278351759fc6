"""The contract every backend passes, shipped as code so out-of-tree backends can reuse it.

A backend's test module subclasses :class:`BackendContract` in a class whose name starts with
``Test`` and implements :meth:`BackendContract.create_backend`; nothing here is collected by
pytest by itself. The async tests need an ``anyio_backend`` fixture (stepsource's
``tests/conftest.py`` runs them on asyncio and trio). :class:`BackendComparison` runs a
backend side by side with :class:`~stepsource.adapters.memory.MemoryBackend`, the
reference, over random operations and asserts both give the same answers (key-value revisions
are compared through a map, since backends may number them differently).
:func:`kv_increment` is the counter pattern (rate limits, quotas) the contract races.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    NewEvent,
    Outgoing,
    QueueUpdate,
    RecordedEvent,
    Snapshot,
)
from stepsource.errors import (
    LimitExceededError,
    StepsourceError,
    UsageError,
    VersionConflictError,
)

__all__ = [
    "BackendComparison",
    "BackendContract",
    "check_log",
    "enqueue",
    "kv_increment",
    "make_commit",
    "suspend",
]


def make_commit(
    stream_id: str,
    expected_version: int,
    count: int = 1,
    *,
    queue: QueueUpdate | None = None,
    lease_owner: str | None = None,
    data: bytes = b"",
    consumed: Sequence[int] = (),
    outbox: Sequence[Outgoing] = (),
) -> Commit:
    """A well-formed commit of ``count`` events after ``expected_version``."""
    events = [
        NewEvent(stream_id, v, f"topic-{v}", data or f"{stream_id}:{v}".encode())
        for v in range(expected_version + 1, expected_version + count + 1)
    ]
    return Commit(
        stream_id,
        expected_version,
        events,
        queue=queue,
        lease_owner=lease_owner,
        consumed=tuple(consumed),
        outbox=tuple(outbox),
    )


def enqueue(step_id: str, due_ms: int = 0, priority: int = 0) -> QueueUpdate:
    """A queue update making the stream runnable at ``due_ms``."""
    return QueueUpdate("enqueue", step_id=step_id, priority=priority, due_ms=due_ms)


def suspend(step_id: str, due_ms: int, now_ms: int, priority: int = 0) -> QueueUpdate:
    """A queue update putting the stream to sleep until ``due_ms`` (or ``now_ms`` if its
    inbox still holds items)."""
    return QueueUpdate("suspend", step_id=step_id, priority=priority, due_ms=due_ms, now_ms=now_ms)


async def kv_increment(
    backend: Backend, key: str, now_ms: int, ttl_ms: int | None = None
) -> KVEntry | None:
    """One attempt of the counter pattern (a rate limit, a quota): read the count (decimal
    ASCII, absent = 0) and write count + 1 unless another writer got in between. Returns the
    new entry, or None if this attempt lost the race (and counted nothing)."""
    entry = await backend.kv_get(key, now_ms)
    count = 0 if entry is None else int(entry.data)
    revision = None if entry is None else entry.revision
    return await backend.kv_compare_and_set(key, revision, str(count + 1).encode(), now_ms, ttl_ms)


def check_log(log: list[RecordedEvent], commit_size: int | None = None) -> None:
    """Positions strictly increase; every stream's versions run 1, 2, 3 ... in log order;
    with ``commit_size``, the events of one commit have consecutive positions."""
    positions = [e.position for e in log]
    assert positions == sorted(set(positions)), "positions must strictly increase"
    last: dict[str, int] = {}
    for event in log:
        assert event.version == last.get(event.stream_id, 0) + 1, f"gap before {event}"
        last[event.stream_id] = event.version
        if commit_size and (event.version - 1) % commit_size:
            previous = log[positions.index(event.position) - 1]
            assert previous.position == event.position - 1, "a commit's events interleaved"


class BackendContract(abc.ABC):
    """Behaviour every :class:`~stepsource.adapters.ports.Backend` must show."""

    tmp_path: Path  #: a fresh directory per test, for backends that store files

    @abc.abstractmethod
    def create_backend(self) -> Backend:
        """A new backend on new, empty storage (each call a different store)."""

    def reopen(self, backend: Backend) -> Backend:
        """Another backend object on the same storage, for another thread or event loop.

        The default returns ``backend`` itself (which must then be thread-safe)."""
        return backend

    @pytest.fixture(autouse=True)
    def _use_tmp_path(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @pytest.fixture
    async def backend(self, anyio_backend: str) -> AsyncIterator[Backend]:
        store = self.create_backend()
        await store.open()
        yield store
        await store.aclose()

    # -- the log ----------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_empty_backend(self, backend: Backend) -> None:
        await backend.open()  # idempotent
        assert await backend.read_stream("nothing") == []
        assert await backend.read_all() == []
        assert await backend.stream_version("nothing") == 0
        assert await backend.max_position() == 0

    @pytest.mark.anyio
    async def test_append_and_read_round_trip(self, backend: Backend) -> None:
        first = await backend.append(make_commit("s1", 0, 3, data=b"\x00\xffbytes"))
        second = await backend.append(make_commit("s2", 0, 2))
        events = await backend.read_stream("s1")
        assert [(e.stream_id, e.version, e.topic, e.data) for e in events] == [
            ("s1", v, f"topic-{v}", b"\x00\xffbytes") for v in (1, 2, 3)
        ]
        assert [e.position for e in events] == [first - 2, first - 1, first]
        assert [e.version for e in await backend.read_stream("s2")] == [1, 2]
        assert second == (await backend.read_stream("s2"))[-1].position > first
        assert await backend.read_all() == [*events, *await backend.read_stream("s2")]

    @pytest.mark.anyio
    async def test_malformed_commits_are_refused(self, backend: Backend) -> None:
        bad_version = Commit("s", 0, [NewEvent("s", 2, "t", b"")])
        gap = Commit("s", 0, [NewEvent("s", 1, "t", b""), NewEvent("s", 3, "t", b"")])
        other_stream = Commit("s", 0, [NewEvent("x", 1, "t", b"")])
        for commit in (bad_version, gap, other_stream):
            with pytest.raises(UsageError):
                await backend.append(commit)
        assert await backend.max_position() == 0

    @pytest.mark.anyio
    async def test_wrong_expected_version_conflicts_and_stores_nothing(
        self, backend: Backend
    ) -> None:
        await backend.append(make_commit("s", 0, 2))
        for expected in (0, 1, 3, 7):  # behind (duplicate versions) and ahead (a gap)
            with pytest.raises(VersionConflictError) as caught:
                await backend.append(make_commit("s", expected, 3))
            assert caught.value.execution_id == "s"
            assert f"version {expected}" in str(caught.value)
        assert [e.version for e in await backend.read_stream("s")] == [1, 2]
        assert await backend.max_position() == 2
        assert await backend.append(make_commit("s", 2, 1)) == 3

    @pytest.mark.anyio
    async def test_read_stream_bounds_are_inclusive(self, backend: Backend) -> None:
        for version in range(10):
            await backend.append(make_commit("s", version))
            await backend.append(make_commit(f"other-{version}", 0))

        async def versions(start: int = 1, stop: int | None = None) -> list[int]:
            return [e.version for e in await backend.read_stream("s", start, stop)]

        assert await versions(3, 5) == [3, 4, 5]
        assert await versions(8) == [8, 9, 10]
        assert await versions(1, 2) == [1, 2]
        assert await versions(4, 4) == [4]
        assert await versions(11) == []
        assert await versions(5, 4) == []
        assert await backend.stream_version("s") == 10

    @pytest.mark.anyio
    async def test_read_all_pages_in_position_order(self, backend: Backend) -> None:
        for round_ in range(4):
            for stream in ("a", "b", "c"):
                await backend.append(make_commit(stream, round_ * 3, 3))
        everything = await backend.read_all(0, 1000)
        assert len(everything) == 36
        check_log(everything, commit_size=3)
        assert everything[-1].position == await backend.max_position()
        paged: list[RecordedEvent] = []
        while page := await backend.read_all(paged[-1].position if paged else 0, limit=5):
            assert len(page) <= 5
            paged.extend(page)
        assert paged == everything
        assert await backend.read_all(everything[-1].position) == []
        assert await backend.read_all(everything[10].position, 3) == everything[11:14]

    # -- concurrency ------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_many_concurrent_appends(self, backend: Backend) -> None:
        async def writer(task: int) -> None:
            for n in range(20):
                await backend.append(make_commit(f"task-{task}", n * 2, 2))

        async with anyio.create_task_group() as group:
            for task in range(50):
                group.start_soon(writer, task)
        log = await backend.read_all(0, 5000)
        assert len(log) == 50 * 20 * 2
        check_log(log, commit_size=2)
        assert {await backend.stream_version(f"task-{t}") for t in range(50)} == {40}

    @pytest.mark.anyio
    async def test_racing_writers_one_wins_others_unharmed(self, backend: Backend) -> None:
        outcomes: dict[str, list[str]] = {}

        async def attempt(stream: str, tag: str) -> None:
            try:
                await backend.append(make_commit(stream, 0, 2, data=tag.encode()))
            except VersionConflictError:
                outcomes.setdefault(stream, []).append("conflict")
            else:
                outcomes.setdefault(stream, []).append(tag)

        async with anyio.create_task_group() as group:
            for n in range(20):
                group.start_soon(attempt, f"race-{n}", "first")
                group.start_soon(attempt, f"calm-{n}", "only")
                group.start_soon(attempt, f"race-{n}", "second")
        for n in range(20):
            race = outcomes[f"race-{n}"]
            assert sorted(race) in (["conflict", "first"], ["conflict", "second"])
            winner = next(tag for tag in race if tag != "conflict")
            assert [e.data for e in await backend.read_stream(f"race-{n}")] == [winner.encode()] * 2
            assert outcomes[f"calm-{n}"] == ["only"]
        check_log(await backend.read_all(0, 1000), commit_size=2)

    @pytest.mark.anyio
    async def test_writer_threads_while_reading(self, backend: Backend, anyio_backend: str) -> None:
        threads, commits, size = 4, 50, 5

        def write_in_own_loop(thread: int) -> None:
            async def run() -> None:
                store = self.reopen(backend)
                for n in range(commits):
                    await store.append(make_commit(f"thread-{thread}", n * size, size))
                if store is not backend:
                    await store.aclose()

            anyio.run(run, backend=anyio_backend)

        seen: list[RecordedEvent] = []
        writers_done = anyio.Event()

        async def read_along() -> None:
            while True:
                finished = writers_done.is_set()
                page = await backend.read_all(seen[-1].position if seen else 0, limit=37)
                seen.extend(page)
                if finished and not page:
                    return
                await anyio.sleep(0 if page else 0.001)

        async with anyio.create_task_group() as group:
            group.start_soon(read_along)
            async with anyio.create_task_group() as writers:
                for thread in range(threads):
                    writers.start_soon(anyio.to_thread.run_sync, write_in_own_loop, thread)
            writers_done.set()
        final = await backend.read_all(0, 10_000)
        assert len(final) == threads * commits * size
        assert seen == final  # a reader never skipped an event that showed up later
        check_log(final, commit_size=size)

    # -- the work queue ---------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_lease_order_and_due_times(self, backend: Backend) -> None:
        plan = {"low": (0, 10), "high-late": (5, 30), "high-early": (5, 20), "future": (9, 500)}
        for stream, (priority, due) in plan.items():
            await backend.append(make_commit(stream, 0, queue=enqueue("step", due, priority)))
        await backend.append(make_commit("elsewhere", 0, queue=enqueue("other-step", 0, 99)))
        assert await backend.next_due_ms(["step"]) == 10
        assert await backend.next_due_ms(["nothing"]) is None
        leases = await backend.lease("w1", ["step"], now_ms=100, lease_ms=50, limit=10)
        assert [lease.stream_id for lease in leases] == ["high-early", "high-late", "low"]
        assert leases[0].step_id == "step"
        assert leases[0].priority == 5
        assert {lease.expires_ms for lease in leases} == {150}
        assert await backend.next_due_ms(["step"]) == 151  # when the leases may be taken over
        assert await backend.lease("w2", ["step"], now_ms=100, lease_ms=50, limit=10) == []
        limited = await backend.lease("w2", ["step", "other-step"], 600, 50, limit=1)
        assert [lease.stream_id for lease in limited] == ["elsewhere"]

    @pytest.mark.anyio
    async def test_lease_held_until_expiry_then_taken_over(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        assert len(await backend.lease("w1", ["step"], 0, lease_ms=100, limit=5)) == 1
        assert await backend.lease("w2", ["step"], 100, lease_ms=100, limit=5) == []
        assert await backend.renew("w1", ["s", "unknown"], 50, lease_ms=100) == ["s"]
        assert await backend.lease("w2", ["step"], 150, lease_ms=100, limit=5) == []
        taken = await backend.lease("w2", ["step"], 151, lease_ms=100, limit=5)
        assert [(lease.stream_id, lease.expires_ms) for lease in taken] == [("s", 251)]
        assert await backend.renew("w1", ["s"], 160, lease_ms=100) == []
        with pytest.raises(VersionConflictError):  # the zombie never writes
            await backend.append(make_commit("s", 1, lease_owner="w1"))
        await backend.release("w1", "s", due_ms=10_000)  # not its lease: no effect
        assert await backend.lease("w3", ["step"], 200, 100, 5) == []
        await backend.append(make_commit("s", 1, lease_owner="w2"))
        assert await backend.stream_version("s") == 2

    @pytest.mark.anyio
    async def test_lease_owner_guard(self, backend: Backend) -> None:
        with pytest.raises(VersionConflictError):  # no queue row, so no lease
            await backend.append(make_commit("s", 0, lease_owner="w1"))
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        with pytest.raises(VersionConflictError):  # queued but not leased
            await backend.append(make_commit("s", 1, lease_owner="w1"))
        await backend.lease("w1", ["step"], 0, 100, 1)
        await backend.append(make_commit("s", 1, 2, lease_owner="w1"))
        assert await backend.stream_version("s") == 3

    @pytest.mark.anyio
    async def test_release_reschedules_and_done_removes(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        await backend.lease("w1", ["step"], 0, 100, 1)
        await backend.release("w1", "s", due_ms=500)
        assert await backend.next_due_ms(["step"]) == 500
        assert await backend.lease("w2", ["step"], 499, 100, 1) == []
        assert len(await backend.lease("w2", ["step"], 500, 100, 1)) == 1
        await backend.release("w2", "s")  # no due_ms: keeps its due time
        assert await backend.next_due_ms(["step"]) == 500
        await backend.lease("w2", ["step"], 600, 100, 1)
        await backend.append(make_commit("s", 1, queue=enqueue("step", 700), lease_owner="w2"))
        assert await backend.next_due_ms(["step"]) == 700  # enqueue clears the lease
        await backend.append(make_commit("s", 2, queue=QueueUpdate("done")))
        assert await backend.next_due_ms(["step"]) is None
        assert await backend.lease("w3", ["step"], 10_000, 100, 5) == []

    # -- the inbox --------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_inbox_items_in_order_and_paged(self, backend: Backend) -> None:
        assert await backend.inbox("s") == []
        ids = []
        for n in range(7):
            ids.append(await backend.post("s", "signal", f"n{n}", b"\x00\xff%d" % n, 100 + n))
            await backend.post("other", "event", f"o{n}", b"", 100 + n)
        assert ids == sorted(set(ids))
        items = await backend.inbox("s")
        assert items == [
            InboxItem(ids[n], "s", "signal", f"n{n}", b"\x00\xff%d" % n, 100 + n) for n in range(7)
        ]
        assert {item.name for item in await backend.inbox("other")} == {f"o{n}" for n in range(7)}
        paged: list[InboxItem] = []
        while page := await backend.inbox("s", paged[-1].id if paged else 0, limit=3):
            assert len(page) <= 3
            paged.extend(page)
        assert paged == items
        assert await backend.inbox("s", ids[2], 2) == items[3:5]
        assert await backend.inbox("s", ids[-1]) == []
        assert await backend.inbox("s", 0, 0) == []
        assert await backend.inbox("nothing") == []

    @pytest.mark.anyio
    async def test_concurrent_posts_get_distinct_ids(self, backend: Backend) -> None:
        returned: list[int] = []

        async def client(n: int) -> None:
            for k in range(3):
                returned.append(await backend.post(f"s{n % 3}", "signal", f"{n}-{k}", b"", 0))

        async with anyio.create_task_group() as group:
            for n in range(10):
                group.start_soon(client, n)
        assert len(set(returned)) == 30
        stored = [item for s in ("s0", "s1", "s2") for item in await backend.inbox(s)]
        assert sorted(item.id for item in stored) == sorted(returned)
        for s in ("s0", "s1", "s2"):
            names = [item.name for item in await backend.inbox(s)]
            for n in range(10):  # one client's posts keep their order
                mine = [name for name in names if name.startswith(f"{n}-")]
                assert mine == sorted(mine)

    @pytest.mark.anyio
    async def test_consumed_items_go_with_the_commit_only(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        first, second, third = [await backend.post("s", "signal", n, b"", 0) for n in "abc"]
        elsewhere = await backend.post("t", "signal", "x", b"", 0)
        await backend.lease("w1", ["step"], 0, 100, 1)
        with pytest.raises(VersionConflictError):  # stale version: items stay
            await backend.append(make_commit("s", 0, consumed=[first], lease_owner="w1"))
        with pytest.raises(VersionConflictError):  # not the lease holder: items stay
            await backend.append(make_commit("s", 1, consumed=[first], lease_owner="w2"))
        assert [item.id for item in await backend.inbox("s")] == [first, second, third]
        gone = 10**9  # never posted: not an error
        await backend.append(
            make_commit("s", 1, 2, consumed=[first, second, gone, elsewhere], lease_owner="w1")
        )
        assert [item.id for item in await backend.inbox("s")] == [third]
        assert [item.id for item in await backend.inbox("t")] == [elsewhere]  # not this stream's
        await backend.append(make_commit("s", 3, 0, consumed=[first, third], lease_owner="w1"))
        assert await backend.inbox("s") == []
        assert await backend.stream_version("s") == 3
        for bad in (["1"], [2**63], [True]):
            with pytest.raises(UsageError):
                await backend.append(make_commit("t", 0, consumed=bad))  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            await backend.append(make_commit("t", 0, queue=suspend("step", 0, 2**64)))
        with pytest.raises(UsageError):
            await backend.post("t", "signal", "x", b"", -(2**63) - 1)
        assert await backend.stream_version("t") == 0
        assert [item.id for item in await backend.inbox("t")] == [elsewhere]

    @pytest.mark.anyio
    async def test_a_commits_outbox_is_posted_with_it_and_only_with_it(
        self, backend: Backend
    ) -> None:
        await backend.append(make_commit("parent", 0, queue=enqueue("flow", due_ms=10**6)))
        nudge = Outgoing("parent", "child", "kid", b"{}", 5)
        with pytest.raises(VersionConflictError):  # a refused commit posts nothing
            await backend.append(make_commit("kid", 3, outbox=[nudge]))
        assert await backend.inbox("parent") == []
        assert await backend.lease("w", ["flow"], 5, 100, 1) == []  # still asleep
        await backend.append(make_commit("kid", 0, outbox=[nudge]))
        [item] = await backend.inbox("parent")
        assert (item.kind, item.name, item.data) == ("child", "kid", b"{}")
        assert [lease.stream_id for lease in await backend.lease("w", ["flow"], 5, 100, 1)] == [
            "parent"
        ]  # the nudge woke the parent

    @pytest.mark.anyio
    async def test_post_wakes_a_sleeping_execution(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step", due_ms=1000)))
        await backend.append(make_commit("early", 0, queue=enqueue("other", due_ms=50)))
        assert await backend.lease("w1", ["step"], 100, 10, 5) == []
        await backend.post("s", "event", "go", b"{}", 100)
        await backend.post("early", "event", "go", b"{}", 100)  # already due: unchanged
        assert await backend.next_due_ms(["step"]) == 100
        assert await backend.next_due_ms(["other"]) == 50
        leases = await backend.lease("w1", ["step"], 100, 10, 5)
        assert [lease.stream_id for lease in leases] == ["s"]

    @pytest.mark.anyio
    async def test_post_to_a_leased_execution_keeps_the_lease(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        assert len(await backend.lease("w1", ["step"], 0, 100, 1)) == 1
        item = await backend.post("s", "cancel", "", b"", 10)
        assert await backend.lease("w2", ["step"], 10, 100, 1) == []
        assert await backend.renew("w1", ["s"], 20, 100) == ["s"]
        await backend.append(make_commit("s", 1, consumed=[item], lease_owner="w1"))
        assert await backend.inbox("s") == []

    @pytest.mark.anyio
    async def test_post_without_a_queue_row_is_kept(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=QueueUpdate("done")))
        item = await backend.post("s", "signal", "late", b"x", 5)
        assert [i.id for i in await backend.inbox("s")] == [item]
        assert await backend.next_due_ms(["step"]) is None
        too_big = b"x" * (backend.max_commit_bytes + 1)
        with pytest.raises(LimitExceededError):
            await backend.post("s", "signal", "huge", too_big, 5)
        assert len(await backend.inbox("s")) == 1

    @pytest.mark.anyio
    async def test_suspend_with_pending_items_is_due_now(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
        await backend.lease("w1", ["step"], 0, 100, 1)
        await backend.append(
            make_commit("s", 1, queue=suspend("step", 10_000, 40), lease_owner="w1")
        )
        assert await backend.next_due_ms(["step"]) == 10_000  # no items: sleeps until due
        assert await backend.lease("w1", ["step"], 50, 100, 1) == []
        await backend.post("s", "signal", "a", b"", 9_000)  # wakes it at 9_000
        await backend.lease("w1", ["step"], 9_000, 100, 1)
        late = await backend.post("s", "signal", "b", b"", 9_010)  # the actor has not seen it
        await backend.append(
            make_commit("s", 2, queue=suspend("step", 20_000, 9_050), lease_owner="w1")
        )
        assert await backend.next_due_ms(["step"]) == 9_050  # items pending: due at once
        assert len(await backend.lease("w2", ["step"], 9_050, 100, 1)) == 1
        items = [item.id for item in await backend.inbox("s")]
        await backend.append(
            make_commit(
                "s", 3, queue=suspend("step", 20_000, 9_100), lease_owner="w2", consumed=items
            )
        )
        assert late in items
        assert await backend.next_due_ms(["step"]) == 20_000  # consumed them all: sleeps
        await backend.append(make_commit("s", 4, queue=suspend("step", 5, 9_200)))
        assert await backend.next_due_ms(["step"]) == 5  # due earlier than now stays

    @pytest.mark.anyio
    async def test_next_due_counts_expired_leases(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, queue=enqueue("step", due_ms=10)))
        await backend.append(make_commit("t", 0, queue=enqueue("step", due_ms=500)))
        await backend.lease("w1", ["step"], 20, 100, 1)  # s, until 120
        assert await backend.next_due_ms(["step"]) == 121
        assert await backend.lease("w2", ["step"], 120, 100, 1) == []
        assert await backend.renew("w1", ["s"], 300, 500) == ["s"]
        assert await backend.next_due_ms(["step"]) == 500
        assert [lease.stream_id for lease in await backend.lease("w2", ["step"], 500, 1, 1)] == [
            "t"
        ]
        assert await backend.next_due_ms(["step"]) == 502
        assert await backend.next_due_ms(["other"]) is None

    # -- published step definitions ---------------------------------------------------------
    @pytest.mark.anyio
    async def test_definitions_replace_and_read_back(self, backend: Backend) -> None:
        assert await backend.published_definition("greet") is None
        await backend.publish_definition("greet", "1", b'{"type": "object"}')
        await backend.publish_definition("other", "7", b"{}")
        assert await backend.published_definition("greet") == ("1", b'{"type": "object"}')
        await backend.publish_definition("greet", "2", b'{"\xc3\xa9": true}')
        assert await backend.published_definition("greet") == ("2", b'{"\xc3\xa9": true}')
        await backend.publish_definition("greet", "1", b"[]")  # replaced, whatever the version
        assert await backend.published_definition("greet") == ("1", b"[]")
        assert await backend.published_definition("other") == ("7", b"{}")
        await backend.aclose()
        assert await backend.published_definition("greet") == ("1", b"[]")
        assert await backend.published_definition("GREET") is None

    # -- snapshots and lifecycle ------------------------------------------------------------
    @pytest.mark.anyio
    async def test_snapshots(self, backend: Backend) -> None:
        assert await backend.latest_snapshot("s") is None
        await backend.save_snapshot(Snapshot("s", 5, "state", b"five"))
        await backend.save_snapshot(Snapshot("other", 9, "state", b"nine"))
        assert await backend.latest_snapshot("s") == Snapshot("s", 5, "state", b"five")
        assert await backend.latest_snapshot("s", max_version=5) is not None
        assert await backend.latest_snapshot("s", max_version=4) is None
        await backend.save_snapshot(Snapshot("s", 8, "state", b"eight"))
        await backend.save_snapshot(Snapshot("s", 6, "state", b"older, ignored"))
        assert await backend.latest_snapshot("s") == Snapshot("s", 8, "state", b"eight")

    @pytest.mark.anyio
    async def test_usable_after_aclose(self, backend: Backend) -> None:
        await backend.append(make_commit("s", 0, 2, queue=enqueue("step")))
        await backend.aclose()
        assert [e.version for e in await backend.read_stream("s")] == [1, 2]
        await backend.aclose()
        await backend.aclose()
        assert await backend.append(make_commit("s", 2)) == 3
        await backend.aclose()
        assert len(await backend.lease("w", ["step"], 0, 10, 1)) == 1
        assert await backend.max_position() == 3
        item = await backend.post("s", "signal", "x", b"y", 1)
        await backend.aclose()
        assert [i.id for i in await backend.inbox("s")] == [item]

    # -- the global key-value store ---------------------------------------------------------
    @pytest.mark.anyio
    async def test_kv_get_put_round_trip(self, backend: Backend) -> None:
        assert await backend.kv_get("k", 0) is None
        entry = await backend.kv_put("k", b"\x00\xffvalue", 10)
        assert entry == KVEntry("k", b"\x00\xffvalue", entry.revision, None)
        assert entry.revision > 0
        assert await backend.kv_get("k", 10) == entry
        assert await backend.kv_get("k", 2**63 - 1) == entry  # no TTL: never expires
        assert await backend.kv_get("K", 10) is None  # keys are case-sensitive
        odd = ["a.b", "*", ">", "with space", "ключ/ü 🙂", "k" * 512, "é" * 512, "$KV.x"]
        written = {key: await backend.kv_put(key, key.encode(), 11) for key in odd}
        for key in odd:  # keys are opaque text: a backend with a narrower syntax encodes them
            assert await backend.kv_get(key, 12) == written[key]
            assert written[key].data == key.encode()
        empty = await backend.kv_put("empty", b"", 12)
        assert empty.data == b""
        assert type(empty.data) is bytes
        got = await backend.kv_get("empty", 12)
        assert got is not None
        assert type(got.data) is bytes
        assert await backend.kv_get("k", 13) == entry  # the others left it alone

    @pytest.mark.anyio
    async def test_kv_revisions_increase(self, backend: Backend) -> None:
        seen = []
        for n in range(5):
            seen.append((await backend.kv_put("k", b"%d" % n, n)).revision)
            await backend.kv_put(f"other-{n}", b"", n)
        cas = await backend.kv_compare_and_set("k", seen[-1], b"cas", 5)
        assert cas is not None
        seen.append(cas.revision)
        await backend.kv_delete("k", 6)
        seen.append((await backend.kv_put("k", b"after delete", 7, ttl_ms=1)).revision)
        # expired at 8: written again, it still gets a revision above every earlier one
        again = await backend.kv_compare_and_set("k", None, b"after expiry", 8)
        assert again is not None
        seen.append(again.revision)
        assert seen == sorted(set(seen))
        assert seen[0] > 0

    @pytest.mark.anyio
    async def test_kv_ttl_expiry(self, backend: Backend) -> None:
        entry = await backend.kv_put("k", b"v", 1000, ttl_ms=100)
        forever = await backend.kv_put("forever", b"f", 1000)
        assert entry.expires_ms == 1100
        for now in (1000, 1050, 1099):
            assert await backend.kv_get("k", now) == entry
        for now in (1100, 1101, 10**12):
            assert await backend.kv_get("k", now) is None
        assert await backend.kv_get("forever", 10**12) == forever
        # expired, the key is absent to compare-and-set too
        assert await backend.kv_compare_and_set("k", entry.revision, b"stale", 1100) is None
        renewed = await backend.kv_compare_and_set("k", None, b"new", 1100, ttl_ms=50)
        assert renewed is not None
        assert renewed == KVEntry("k", b"new", renewed.revision, 1150)
        assert await backend.kv_get("k", 1149) == renewed
        kept = await backend.kv_put("k", b"no ttl", 1149)  # a put without TTL removes it
        assert kept.expires_ms is None
        assert await backend.kv_get("k", 10**12) == kept
        latest = 2**63 - 1
        edge = await backend.kv_put("edge", b"", latest - 10, ttl_ms=10)
        assert edge.expires_ms == latest
        assert await backend.kv_get("edge", latest - 1) == edge
        assert await backend.kv_get("edge", latest) is None

    @pytest.mark.anyio
    async def test_kv_rate_limit_window(self, backend: Backend) -> None:
        """A fixed-window rate limit: at most 3 calls per 1000 ms window, the window's
        counter expiring with it (each increment keeps the window's original expiry)."""

        async def allow(now_ms: int) -> bool:
            while True:
                entry = await backend.kv_get("rate:api", now_ms)
                if entry is None:
                    first = await backend.kv_compare_and_set(
                        "rate:api", None, b"1", now_ms, ttl_ms=1000
                    )
                    if first is not None:
                        return True
                    continue
                if int(entry.data) >= 3:
                    return False
                assert entry.expires_ms is not None
                counted = await backend.kv_compare_and_set(
                    "rate:api",
                    entry.revision,
                    b"%d" % (int(entry.data) + 1),
                    now_ms,
                    ttl_ms=entry.expires_ms - now_ms,
                )
                if counted is not None:
                    assert counted.expires_ms == entry.expires_ms
                    return True

        calls = [0, 100, 200, 300, 999, 1000, 1001, 1500, 1999, 2000]
        assert [await allow(now) for now in calls] == [
            *(True, True, True, False, False),  # window 0..999
            *(True, True, True, False),  # window 1000..1999
            True,
        ]

    @pytest.mark.anyio
    async def test_kv_compare_and_set(self, backend: Backend) -> None:
        created = await backend.kv_compare_and_set("k", None, b"one", 0)
        assert created is not None
        assert created == KVEntry("k", b"one", created.revision, None)
        assert await backend.kv_compare_and_set("k", None, b"dup", 1) is None  # present
        second = await backend.kv_compare_and_set("k", created.revision, b"two", 2, ttl_ms=5)
        assert second is not None
        assert second == KVEntry("k", b"two", second.revision, 7)
        assert second.revision > created.revision
        for expected in (created.revision, second.revision + 1, 10**15):  # stale, unknown
            assert await backend.kv_compare_and_set("k", expected, b"no", 3) is None
        assert await backend.kv_get("k", 3) == second  # a refused CAS wrote nothing
        assert await backend.kv_compare_and_set("absent", second.revision, b"no", 3) is None
        assert await backend.kv_compare_and_set("absent", created.revision, b"no", 3) is None
        assert await backend.kv_get("absent", 3) is None
        third = await backend.kv_compare_and_set("k", second.revision, b"three", 6)
        assert third is not None
        assert third.expires_ms is None  # the TTL belongs to one write
        assert await backend.kv_get("k", 100) == third

    @pytest.mark.anyio
    async def test_kv_delete(self, backend: Backend) -> None:
        await backend.kv_delete("never", 0)  # absent: nothing happens
        entry = await backend.kv_put("k", b"v", 0)
        other = await backend.kv_put("other", b"o", 0)
        await backend.kv_delete("k", 1)
        assert await backend.kv_get("k", 1) is None
        assert await backend.kv_get("other", 1) == other
        await backend.kv_delete("k", 2)  # twice: still fine
        assert await backend.kv_compare_and_set("k", entry.revision, b"stale", 3) is None
        assert await backend.kv_get("k", 3) is None
        back = await backend.kv_compare_and_set("k", None, b"back", 3, ttl_ms=2)
        assert back is not None
        assert back.revision > entry.revision
        await backend.kv_delete("k", 10)  # expired already: fine too
        assert await backend.kv_get("k", 4) is None  # deleted, not merely expired

    @pytest.mark.anyio
    async def test_kv_bad_input_is_refused_before_writing(self, backend: Backend) -> None:
        def every_call(key: object, now: object) -> list[Awaitable[object]]:
            return [
                backend.kv_get(key, now),  # type: ignore[arg-type]
                backend.kv_put(key, b"v", now),  # type: ignore[arg-type]
                backend.kv_compare_and_set(key, None, b"v", now),  # type: ignore[arg-type]
                backend.kv_delete(key, now),  # type: ignore[arg-type]
            ]

        bad_keys: list[object] = ["", "k" * 513, "a\x00b", "\ud800", 7, b"k", None]
        bad_times: list[object] = [2**63, -(2**63) - 1, 1.5, True, "0", None]
        calls = [call for key in bad_keys for call in every_call(key, 0)]
        calls += [call for now in bad_times for call in every_call("k", now)]
        for call in calls:
            with pytest.raises(UsageError):
                await call
        bad_ttls: list[object] = [0, -5, 2**63, True, 1.0, "10"]
        for ttl in bad_ttls:
            with pytest.raises(UsageError):
                await backend.kv_put("k", b"v", 0, ttl_ms=ttl)  # type: ignore[arg-type]
            with pytest.raises(UsageError):
                await backend.kv_compare_and_set("k", None, b"v", 0, ttl)  # type: ignore[arg-type]
        with pytest.raises(UsageError):  # expires beyond 64 bits
            await backend.kv_put("k", b"v", 2**63 - 10, ttl_ms=10)
        bad_revisions: list[object] = [0, -1, 2**63, True, "1", 1.0]
        for revision in bad_revisions:
            with pytest.raises(UsageError):
                await backend.kv_compare_and_set("k", revision, b"v", 0)  # type: ignore[arg-type]
        bad_data: list[object] = ["text", None, 5, [1]]
        for data in bad_data:
            with pytest.raises(UsageError):
                await backend.kv_put("k", data, 0)  # type: ignore[arg-type]
        too_big = b"x" * (backend.max_commit_bytes + 1)
        with pytest.raises(LimitExceededError):
            await backend.kv_put("k", too_big, 0)
        with pytest.raises(LimitExceededError):
            await backend.kv_compare_and_set("k", None, too_big, 0)
        assert await backend.kv_get("k", 0) is None
        ok = await backend.kv_compare_and_set("k", None, b"v", 0)  # nothing was written before
        assert ok is not None

    @pytest.mark.anyio
    async def test_kv_racing_compare_and_set_one_wins(self, backend: Backend) -> None:
        for round_ in range(5):
            current = await backend.kv_get("k", round_)
            revision = None if current is None else current.revision
            results: dict[int, KVEntry | None] = {}

            async def attempt(
                task: int, revision: int | None, now: int, into: dict[int, KVEntry | None]
            ) -> None:
                into[task] = await backend.kv_compare_and_set("k", revision, b"%d" % task, now)

            async with anyio.create_task_group() as group:
                for task in range(10):
                    group.start_soon(attempt, task, revision, round_, results)
            winners = [entry for entry in results.values() if entry is not None]
            assert len(winners) == 1, results
            assert await backend.kv_get("k", round_) == winners[0]

    @pytest.mark.anyio
    async def test_kv_counter_from_threads(self, backend: Backend, anyio_backend: str) -> None:
        """Threads, each with its own loop (and, where the backend has them, connections),
        increment one counter by compare-and-set with retries: no increment is lost."""
        threads, increments = 4, 15
        attempts = [0] * threads

        def count_in_own_loop(thread: int) -> None:
            async def run() -> None:
                store = self.reopen(backend)
                for _ in range(increments):
                    attempts[thread] += 1
                    while await kv_increment(store, "counter", 0) is None:
                        attempts[thread] += 1
                if store is not backend:
                    await store.aclose()

            anyio.run(run, backend=anyio_backend)

        async with anyio.create_task_group() as group:
            for thread in range(threads):
                group.start_soon(anyio.to_thread.run_sync, count_in_own_loop, thread)
        final = await backend.kv_get("counter", 0)
        assert final is not None
        assert int(final.data) == threads * increments <= sum(attempts)

    @pytest.mark.anyio
    async def test_kv_survives_aclose_and_reopening(self, backend: Backend) -> None:
        entry = await backend.kv_put("k", b"v", 0, ttl_ms=1000)
        await backend.aclose()
        assert await backend.kv_get("k", 1) == entry
        other = self.reopen(backend)
        assert await other.kv_get("k", 2) == entry
        newer = await other.kv_compare_and_set("k", entry.revision, b"w", 3)
        if other is not backend:
            await other.aclose()
        assert newer is not None
        assert await backend.kv_get("k", 4) == newer
        assert newer.revision > entry.revision

    # -- against the reference --------------------------------------------------------------
    def test_matches_memory_reference(self, anyio_backend: str) -> None:
        create_backend = self.create_backend
        with start_blocking_portal(anyio_backend) as portal:

            class Comparison(BackendComparison):
                def __init__(self) -> None:
                    super().__init__(portal, create_backend)

            run_state_machine_as_test(
                Comparison,
                settings=settings(
                    max_examples=50,
                    stateful_step_count=30,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )


_Outcome = tuple[str, object]
_STREAMS = st.sampled_from(["s1", "s2", "s3"])
_WORKERS = st.sampled_from(["w1", "w2"])
_STEP = st.sampled_from(["a", "b"])
_ASLEEP = ["asleep-s1", "asleep-s2", "asleep-s3"]  # steps of `suspend_actor`, one per stream
_STEPS = st.sampled_from([["a", "b"], ["a", "b"], ["a"], ["b"], [], ["a", "b", *_ASLEEP]])
_TIMES = st.sampled_from([0, 1, 5, 10])  # few values, so that times often coincide
_ITEM_IDS = st.integers(1, 12)  # inbox ids: posted ones, others' and ones never posted
_KEYS = st.sampled_from(["k1", "k2", "k3"])
_TTLS = st.none() | st.sampled_from([1, 3, 10])
_ADVANCE = st.sampled_from([0, 0, 1, 3])
_NEVER_ISSUED = 10**15  # a revision no backend hands out in a short run


class BackendComparison(RuleBasedStateMachine):
    """Runs a backend beside :class:`MemoryBackend` and compares every answer exactly.

    Both number positions from 1, one per event, so even positions must agree; a backend
    numbered otherwise overrides :meth:`compare` to map its positions first."""

    def __init__(self, portal: BlockingPortal, create_backend: Callable[[], Backend]) -> None:
        super().__init__()
        self.portal = portal
        self.reference = MemoryBackend()
        self.backend = create_backend()
        self.now = 0
        #: key-value revisions: the reference's -> the backend's (numbering may differ)
        self.kv_revisions: dict[int, int] = {}
        self.kv_last: dict[tuple[bool, str], int] = {}  # (is reference, key) -> last revision

    def compare_append(self, commit: Commit) -> None:
        self.compare(lambda store: store.append(commit))

    @initialize(plan=st.lists(st.tuples(_STEP, _TIMES, st.integers(0, 2)), min_size=3, max_size=3))
    def queue_every_stream(self, plan: list[tuple[str, int, int]]) -> None:
        for stream, (step, due, priority) in zip(["s1", "s2", "s3"], plan, strict=True):
            self.compare_append(make_commit(stream, 0, queue=enqueue(step, due, priority)))

    def run(self, store: Backend, operation: Callable[[Backend], Awaitable[object]]) -> _Outcome:
        async def outcome() -> _Outcome:
            try:
                return ("ok", await operation(store))
            except StepsourceError as exc:
                return ("error", type(exc).__name__)

        return self.portal.call(outcome)

    def compare(self, operation: Callable[[Backend], Awaitable[object]]) -> _Outcome:
        expected = self.run(self.reference, operation)
        actual = self.run(self.backend, operation)
        assert actual == expected
        return expected

    def compare_kv(self, operation: Callable[[Backend], Awaitable[KVEntry | None]]) -> None:
        """Compare a key-value call whose answer is an entry or None: the backend's revision
        must be the one mapped to the reference's, or, for a new write, a fresh one above the
        key's last (and then it is mapped)."""
        expected = self.run(self.reference, operation)
        actual = self.run(self.backend, operation)
        for is_reference, (status, entry) in ((True, expected), (False, actual)):
            if status == "ok" and isinstance(entry, KVEntry):
                last = self.kv_last.get((is_reference, entry.key), 0)
                assert entry.revision >= last, f"revisions of {entry.key!r} went back"
                self.kv_last[is_reference, entry.key] = entry.revision
        if expected[0] == actual[0] == "ok":
            mine, theirs = expected[1], actual[1]
            if isinstance(mine, KVEntry) and isinstance(theirs, KVEntry):
                if mine.revision not in self.kv_revisions:  # written just now
                    assert theirs.revision not in self.kv_revisions.values()
                    self.kv_revisions[mine.revision] = theirs.revision
                assert self.kv_revisions[mine.revision] == theirs.revision
                actual = ("ok", KVEntry(theirs.key, theirs.data, mine.revision, theirs.expires_ms))
        assert actual == expected

    def backend_revision(self, store: Backend, revision: int | None) -> int | None:
        """``revision`` of the reference as ``store`` numbers it."""
        if store is self.reference or revision is None:
            return revision
        return self.kv_revisions.get(revision, revision)

    @rule(
        stream=_STREAMS,
        offset=st.sampled_from([0, 0, 0, -1, 1]),
        count=st.integers(0, 3),
        data=st.binary(max_size=8),
        queue=st.none()
        | st.builds(enqueue, _STEP, _TIMES, st.integers(0, 2))
        | st.builds(suspend, _STEP, _TIMES, _TIMES, st.integers(0, 2))
        | st.just(QueueUpdate("done")),
        owner=st.none() | _WORKERS,
        consumed=st.lists(_ITEM_IDS, max_size=3),
        take_pending=st.booleans(),
    )
    def append(
        self,
        stream: str,
        offset: int,
        count: int,
        data: bytes,
        queue: QueueUpdate | None,
        owner: str | None,
        consumed: list[int],
        take_pending: bool,
    ) -> None:
        version = self.portal.call(self.reference.stream_version, stream)
        if take_pending:  # as an actor does: everything its stream's inbox holds
            consumed = [*consumed, *(i.id for i in self.portal.call(self.reference.inbox, stream))]
        commit = make_commit(
            stream,
            max(version + offset, 0),
            count,
            queue=queue,
            lease_owner=owner,
            data=data,
            consumed=consumed,
        )
        self.compare_append(commit)
        if queue is not None:  # look at the queue at once, before other rules blur it
            self.compare(lambda store: store.next_due_ms(["a", "b"]))

    @rule(
        stream=_STREAMS,
        kind=st.sampled_from(["signal", "event", "cancel"]),
        name=st.sampled_from(["", "go", "stop"]),
        data=st.binary(max_size=4),
        now=_TIMES,
    )
    def post(self, stream: str, kind: str, name: str, data: bytes, now: int) -> None:
        self.compare(lambda store: store.post(stream, kind, name, data, now))
        self.compare(lambda store: store.next_due_ms(["a", "b"]))

    @rule(
        stream=_STREAMS,
        due=st.sampled_from([10, 100]),
        now=_TIMES,
        post_first=st.booleans(),
        take_pending=st.booleans(),
    )
    def suspend_actor(
        self, stream: str, due: int, now: int, post_first: bool, take_pending: bool
    ) -> None:
        """An actor's last commit before it sleeps, maybe racing a client's post; the row's
        step is the stream's own, so that :meth:`Backend.next_due_ms` shows its due time."""
        if post_first:
            self.compare(lambda store: store.post(stream, "signal", "racing", b"", now))
        version = self.portal.call(self.reference.stream_version, stream)
        pending = self.portal.call(self.reference.inbox, stream)
        step = f"asleep-{stream}"
        commit = make_commit(
            stream,
            version,
            queue=suspend(step, due, now),
            consumed=[item.id for item in pending] if take_pending else (),
        )
        self.compare_append(commit)
        self.compare(lambda store: store.next_due_ms([step]))

    @rule(stream=_STREAMS, after=st.just(0) | _ITEM_IDS, limit=st.integers(0, 4))
    def inbox(self, stream: str, after: int, limit: int) -> None:
        self.compare(lambda store: store.inbox(stream, after, limit))

    @rule(step=_STEP, version=st.sampled_from(["1", "2"]), data=st.binary(max_size=4))
    def publish_definition(self, step: str, version: str, data: bytes) -> None:
        self.compare(lambda store: store.publish_definition(step, version, data))

    @rule(step=_STEP | st.just("c"))
    def published_definition(self, step: str) -> None:
        self.compare(lambda store: store.published_definition(step))

    @rule(stream=_STREAMS, start=st.integers(0, 8), stop=st.none() | st.integers(0, 8))
    def read_stream(self, stream: str, start: int, stop: int | None) -> None:
        self.compare(lambda store: store.read_stream(stream, start, stop))

    @rule(after=st.integers(0, 40), limit=st.integers(0, 6))
    def read_all(self, after: int, limit: int) -> None:
        self.compare(lambda store: store.read_all(after, limit))

    @rule(stream=_STREAMS)
    def versions(self, stream: str) -> None:
        self.compare(lambda store: store.stream_version(stream))
        self.compare(lambda store: store.max_position())

    @rule(
        worker=_WORKERS,
        steps=_STEPS,
        advance=st.sampled_from([0, 0, 1, 5]),
        lease_ms=_TIMES,
        limit=st.sampled_from([0, 1, 2, 3, 3]),
    )
    def lease(self, worker: str, steps: list[str], advance: int, lease_ms: int, limit: int) -> None:
        self.now += advance
        self.compare(lambda store: store.lease(worker, steps, self.now, lease_ms, limit))

    @rule(worker=_WORKERS, streams=st.lists(_STREAMS, max_size=3), lease_ms=_TIMES)
    def renew(self, worker: str, streams: list[str], lease_ms: int) -> None:
        self.compare(lambda store: store.renew(worker, streams, self.now, lease_ms))

    @rule(worker=_WORKERS, stream=_STREAMS, due=st.none() | _TIMES)
    def release(self, worker: str, stream: str, due: int | None) -> None:
        self.compare(lambda store: store.release(worker, stream, due))

    @rule(steps=_STEPS)
    def next_due(self, steps: list[str]) -> None:
        self.compare(lambda store: store.next_due_ms(steps))

    @rule(stream=_STREAMS, version=st.integers(0, 8), data=st.binary(max_size=4))
    def save_snapshot(self, stream: str, version: int, data: bytes) -> None:
        snapshot = Snapshot(stream, version, "snap", data)
        self.compare(lambda store: store.save_snapshot(snapshot))

    @rule(stream=_STREAMS, most=st.none() | st.integers(0, 8))
    def latest_snapshot(self, stream: str, most: int | None) -> None:
        self.compare(lambda store: store.latest_snapshot(stream, most))

    @rule(key=_KEYS, data=st.binary(max_size=4), ttl=_TTLS, advance=_ADVANCE)
    def kv_put(self, key: str, data: bytes, ttl: int | None, advance: int) -> None:
        self.now += advance
        self.compare_kv(lambda store: store.kv_put(key, data, self.now, ttl))

    @rule(
        key=_KEYS,
        which=st.sampled_from(["current", "current", "none", "issued", "never"]),
        pick=st.integers(0, 50),
        data=st.binary(max_size=4),
        ttl=_TTLS,
        advance=_ADVANCE,
    )
    def kv_compare_and_set(
        self, key: str, which: str, pick: int, data: bytes, ttl: int | None, advance: int
    ) -> None:
        self.now += advance
        revision: int | None = None
        if which == "current":  # as the reference sees it now, so mostly a success
            current = self.portal.call(self.reference.kv_get, key, self.now)
            revision = None if current is None else current.revision
        elif which == "issued" and self.kv_revisions:  # any revision ever handed out
            issued = sorted(self.kv_revisions)
            revision = issued[pick % len(issued)]
        elif which == "never":
            revision = _NEVER_ISSUED
        self.compare_kv(
            lambda store: store.kv_compare_and_set(
                key, self.backend_revision(store, revision), data, self.now, ttl
            )
        )

    @rule(key=_KEYS, advance=_ADVANCE)
    def kv_get(self, key: str, advance: int) -> None:
        self.now += advance
        self.compare_kv(lambda store: store.kv_get(key, self.now))

    @rule(key=_KEYS | st.just(""))
    def kv_delete(self, key: str) -> None:
        self.compare(lambda store: store.kv_delete(key, self.now))

    @rule()
    def close_and_carry_on(self) -> None:
        self.compare(lambda store: store.aclose())

    def teardown(self) -> None:
        self.portal.call(self.backend.aclose)
