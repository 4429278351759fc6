"""Helpers the contract suite and its state machine share: well-formed commits, queue
updates, the key-value counter pattern and the log invariants."""

from __future__ import annotations

from collections.abc import Sequence

from stepsource.adapters.ports import (
    Backend,
    Commit,
    KVEntry,
    NewEvent,
    Outgoing,
    QueueUpdate,
    RecordedEvent,
)

__all__ = ["check_log", "enqueue", "kv_increment", "make_commit", "suspend"]


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
