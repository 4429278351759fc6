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
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    run_state_machine_as_test,
)

from stepsource.adapters.contract_kv import KVContract
from stepsource.adapters.contract_machine import BackendComparison
from stepsource.adapters.contract_support import (
    check_log,
    enqueue,
    kv_increment,
    make_commit,
    suspend,
)
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    NewEvent,
    Outgoing,
    QueueUpdate,
    RecordedEvent,
    Snapshot,
)
from stepsource.errors import (
    LimitExceededError,
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


class BackendContract(KVContract, abc.ABC):
    """Behaviour every :class:`~stepsource.adapters.ports.Backend` must show."""

    tmp_path: Path  #: a fresh directory per test, for backends that store files

    @abc.abstractmethod
    def create_backend(self) -> Backend:
        """A new backend on new, empty storage (each call a different store)."""

    #: size of the random comparison with the memory reference (a slow backend may lower it)
    comparison_examples = 50
    comparison_steps = 30

    def create_compared_backend(self) -> Backend:
        """The backend :meth:`test_matches_memory_reference` compares (default: a new one)."""
        return self.create_backend()

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
    async def test_a_commit_may_enqueue_already_leased(self, backend: Backend) -> None:
        """``QueueUpdate(kind="lease")``: scheduled and leased to its starter in one commit,
        held like any lease (renewed, guarded, taken over after expiry)."""
        leased = QueueUpdate("lease", "step", 3, due_ms=0, owner="w1", lease_expires_ms=100)
        if not backend.leases_in_commit:
            with pytest.raises(UsageError):
                await backend.append(make_commit("s", 0, queue=leased))
            return
        await backend.append(make_commit("s", 0, 2, queue=leased))
        assert await backend.lease("w2", ["step"], 50, 100, 5) == []  # held by w1
        assert await backend.next_due_ms(["step"]) == 101
        await backend.append(make_commit("s", 2, lease_owner="w1"))  # the holder writes
        with pytest.raises(VersionConflictError):
            await backend.append(make_commit("s", 3, lease_owner="w2"))
        assert await backend.renew("w1", ["s"], 90, lease_ms=100) == ["s"]
        assert await backend.lease("w2", ["step"], 190, 100, 5) == []
        taken = await backend.lease("w2", ["step"], 191, 100, 5)
        assert [(t.stream_id, t.priority, t.expires_ms) for t in taken] == [("s", 3, 291)]
        with pytest.raises(VersionConflictError):  # the first owner is a zombie now
            await backend.append(make_commit("s", 3, lease_owner="w1"))
        with pytest.raises(UsageError):
            await backend.append(make_commit("t", 0, queue=QueueUpdate("lease", "step")))
        assert await backend.stream_version("t") == 0

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
    async def test_reserved_inbox_ids_are_never_handed_out(self, backend: Backend) -> None:
        """An export's target: its copied streams record the source's inbox ids, so every
        item posted after the reservation has a greater id; a reservation never lowers."""
        await backend.reserve_inbox_ids(1000)
        first = await backend.post("s", "signal", "a", b"1", 100)
        assert first > 1000
        await backend.reserve_inbox_ids(10)  # below what was handed out: no effect
        second = await backend.post("t", "signal", "b", b"2", 100)
        assert second > first
        assert [item.id for item in await backend.inbox("s")] == [first]
        assert [item.id for item in await backend.inbox("s", 1000)] == [first]

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

    # -- against the reference --------------------------------------------------------------
    def test_matches_memory_reference(self, anyio_backend: str) -> None:
        create_backend = self.create_compared_backend
        with start_blocking_portal(anyio_backend) as portal:

            class Comparison(BackendComparison):
                def __init__(self) -> None:
                    super().__init__(portal, create_backend)

            run_state_machine_as_test(
                Comparison,
                settings=settings(
                    max_examples=self.comparison_examples,
                    stateful_step_count=self.comparison_steps,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
