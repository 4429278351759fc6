"""The contract every backend passes, shipped as code so out-of-tree backends can reuse it.

A backend's test module subclasses :class:`BackendContract` in a class whose name starts with
``Test`` and implements :meth:`BackendContract.create_backend`; nothing here is collected by
pytest by itself. The async tests need an ``anyio_backend`` fixture (stepsource's
``tests/conftest.py`` runs them on asyncio and trio). :class:`BackendComparison` runs a
backend side by side with :class:`~stepsource.adapters.memory.MemoryBackend`, the
reference, over random operations and asserts both give the same answers.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
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
    NewEvent,
    QueueUpdate,
    RecordedEvent,
    Snapshot,
)
from stepsource.errors import StepsourceError, UsageError, VersionConflictError

__all__ = ["BackendComparison", "BackendContract", "check_log", "enqueue", "make_commit"]


def make_commit(
    stream_id: str,
    expected_version: int,
    count: int = 1,
    *,
    queue: QueueUpdate | None = None,
    lease_owner: str | None = None,
    data: bytes = b"",
) -> Commit:
    """A well-formed commit of ``count`` events after ``expected_version``."""
    events = [
        NewEvent(stream_id, v, f"topic-{v}", data or f"{stream_id}:{v}".encode())
        for v in range(expected_version + 1, expected_version + count + 1)
    ]
    return Commit(stream_id, expected_version, events, queue=queue, lease_owner=lease_owner)


def enqueue(step_id: str, due_ms: int = 0, priority: int = 0) -> QueueUpdate:
    """A queue update making the stream runnable at ``due_ms``."""
    return QueueUpdate("enqueue", step_id=step_id, priority=priority, due_ms=due_ms)


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
        assert await backend.next_due_ms(["step"]) == 500
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
_STEPS = st.sampled_from([["a", "b"], ["a", "b"], ["a"], ["b"], []])
_TIMES = st.sampled_from([0, 1, 5, 10])  # few values, so that times often coincide


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

    def compare_append(self, commit: Commit) -> None:
        self.compare(lambda store: store.append(commit))

    @initialize(plan=st.lists(st.tuples(_STEP, _TIMES, st.integers(0, 2)), min_size=3, max_size=3))
    def queue_every_stream(self, plan: list[tuple[str, int, int]]) -> None:
        for stream, (step, due, priority) in zip(["s1", "s2", "s3"], plan, strict=True):
            self.compare_append(make_commit(stream, 0, queue=enqueue(step, due, priority)))

    def compare(self, operation: Callable[[Backend], Awaitable[object]]) -> _Outcome:
        async def outcome(store: Backend) -> _Outcome:
            try:
                return ("ok", await operation(store))
            except StepsourceError as exc:
                return ("error", type(exc).__name__)

        expected = self.portal.call(outcome, self.reference)
        actual = self.portal.call(outcome, self.backend)
        assert actual == expected
        return expected

    @rule(
        stream=_STREAMS,
        offset=st.sampled_from([0, 0, 0, -1, 1]),
        count=st.integers(0, 3),
        data=st.binary(max_size=8),
        queue=st.none()
        | st.builds(enqueue, _STEP, _TIMES, st.integers(0, 2))
        | st.just(QueueUpdate("done")),
        owner=st.none() | _WORKERS,
    )
    def append(
        self,
        stream: str,
        offset: int,
        count: int,
        data: bytes,
        queue: QueueUpdate | None,
        owner: str | None,
    ) -> None:
        version = self.portal.call(self.reference.stream_version, stream)
        commit = make_commit(
            stream, max(version + offset, 0), count, queue=queue, lease_owner=owner, data=data
        )
        self.compare_append(commit)

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

    @rule()
    def close_and_carry_on(self) -> None:
        self.compare(lambda store: store.aclose())

    def teardown(self) -> None:
        self.portal.call(self.backend.aclose)
