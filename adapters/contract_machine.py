"""The state machine that runs a backend side by side with the memory reference."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio.from_thread import BlockingPortal
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
)

from stepsource.adapters.contract_support import (
    enqueue,
    make_commit,
    suspend,
)
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import (
    Backend,
    Commit,
    KVEntry,
    QueueUpdate,
    Snapshot,
    kv_scan_all,
)
from stepsource.errors import (
    StepsourceError,
)

__all__ = ["BackendComparison"]


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

    @rule(limit=st.integers(1, 3), advance=_ADVANCE)
    def kv_scan(self, limit: int, advance: int) -> None:
        self.now += advance
        mine = self.portal.call(kv_scan_all, self.reference, self.now, limit)
        theirs = self.portal.call(kv_scan_all, self.backend, self.now, limit)
        assert sorted(theirs) == sorted(mine)
        for key, entry in mine.items():
            assert theirs[key] == KVEntry(
                key, entry.data, self.kv_revisions[entry.revision], entry.expires_ms
            )

    @rule(key=_KEYS | st.just(""))
    def kv_delete(self, key: str) -> None:
        self.compare(lambda store: store.kv_delete(key, self.now))

    @rule()
    def close_and_carry_on(self) -> None:
        self.compare(lambda store: store.aclose())

    def teardown(self) -> None:
        self.portal.call(self.backend.aclose)
