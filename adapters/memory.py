"""The in-process backend: the reference every other backend is compared with.

Everything lives in dicts and lists guarded by one :class:`threading.Lock`, so one
:class:`MemoryBackend` may be shared by tasks of one event loop and by several threads each
running its own loop. Each call is one short critical section: a commit is checked and
applied at once, so it is atomic without transactions. Positions start at 1 and grow by 1
per event, as SQLite's do, so the two can be compared exactly. Key-value revisions come from
one counter per store, as SQLite's do; expired entries are purged lazily on later writes.

The rules every backend applies (:func:`check_commit` and the errors of a refused commit) live
in :mod:`stepsource.adapters._rules`; they are re-exported here under their old names.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.lowlevel

from stepsource.adapters._rules import (
    check_commit,
    check_kv_key,
    check_kv_scan,
    check_kv_write,
    check_post,
    kv_expires_ms,
    kv_live,
    lease_conflict,
    queued_due_ms,
    version_conflict,
    wake_ms,
)
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)

__all__ = ["MemoryBackend", "check_commit", "lease_conflict", "version_conflict"]


@dataclass(slots=True)
class _QueueRow:
    step_id: str
    priority: int
    due_ms: int
    lease_owner: str | None = None
    lease_expires_ms: int = 0

    def runnable(self, now_ms: int) -> bool:
        free = self.lease_owner is None or self.lease_expires_ms < now_ms
        return free and self.due_ms <= now_ms


class MemoryBackend(Backend):
    """Event streams, inboxes, work queue, definitions and snapshots in this process's memory.

    The data lives as long as the object: :meth:`aclose` keeps it, so the backend stays
    usable (and keeps its log) after being closed.
    """

    leases_in_commit = True
    dense_positions = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[RecordedEvent] = []
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._queue: dict[str, _QueueRow] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._inbox: dict[str, dict[int, InboxItem]] = {}  # per stream, in id order
        self._last_item_id = 0
        self._definitions: dict[str, tuple[str, bytes]] = {}
        self._kv: dict[str, KVEntry] = {}
        self._kv_expiries: list[tuple[int, str, int]] = []  # heap of (expires_ms, key, revision)
        self._kv_revision = 0  # the last revision handed out, to any key

    def __repr__(self) -> str:
        return f"MemoryBackend(events={len(self._log)}, streams={len(self._streams)})"

    async def open(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()

    # -- the log ----------------------------------------------------------------------------
    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.max_commit_bytes, leases=True)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            stream = self._streams.get(commit.stream_id, [])
            current = len(stream)
            if current != commit.expected_version:
                raise version_conflict(commit, current)
            row = self._queue.get(commit.stream_id)
            if commit.lease_owner is not None:
                holder = row.lease_owner if row is not None else None
                if holder != commit.lease_owner:
                    raise lease_conflict(commit, holder)
            for event in commit.events:
                recorded = RecordedEvent(
                    stream_id=event.stream_id,
                    version=event.version,
                    topic=event.topic,
                    data=bytes(event.data),
                    position=len(self._log) + 1,
                )
                self._log.append(recorded)
                stream.append(recorded)
            if stream:
                self._streams[commit.stream_id] = stream
            items = self._inbox.get(commit.stream_id)
            if items is not None:
                for item_id in commit.consumed:
                    items.pop(item_id, None)
                if not items:
                    del self._inbox[commit.stream_id]
            for outgoing in commit.outbox:
                self._post_locked(
                    outgoing.stream_id, outgoing.kind, outgoing.name, outgoing.data, outgoing.now_ms
                )
            update = commit.queue
            if update is not None and update.kind in ("enqueue", "suspend"):
                due = queued_due_ms(update, inbox_pending=commit.stream_id in self._inbox)
                self._queue[commit.stream_id] = _QueueRow(update.step_id, update.priority, due)
            elif update is not None and update.kind == "lease":
                self._queue[commit.stream_id] = _QueueRow(
                    update.step_id,
                    update.priority,
                    update.due_ms,
                    update.owner,
                    update.lease_expires_ms,
                )
            elif update is not None:
                self._queue.pop(commit.stream_id, None)
            return stream[-1].position if stream else 0

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            stream = self._streams.get(stream_id, [])
            stop = len(stream) if to_version is None else min(len(stream), to_version)
            return stream[max(from_version, 1) - 1 : max(stop, 0)]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            start = max(after_position, 0)
            return self._log[start : start + max(limit, 0)]

    async def stream_version(self, stream_id: str) -> int:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return len(self._streams.get(stream_id, ()))

    async def max_position(self) -> int:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return len(self._log)

    # -- the work queue ---------------------------------------------------------------------
    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        await anyio.lowlevel.checkpoint()
        wanted = set(step_ids)
        with self._lock:
            candidates = sorted(
                (
                    (-row.priority, row.due_ms, stream_id)
                    for stream_id, row in self._queue.items()
                    if row.step_id in wanted and row.runnable(now_ms)
                ),
            )[: max(limit, 0)]
            leases = []
            for _, _, stream_id in candidates:
                row = self._queue[stream_id]
                row.lease_owner = worker_id
                row.lease_expires_ms = now_ms + lease_ms
                leases.append(Lease(stream_id, row.step_id, row.priority, row.lease_expires_ms))
            return leases

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        await anyio.lowlevel.checkpoint()
        held = []
        with self._lock:
            for stream_id in dict.fromkeys(stream_ids):
                row = self._queue.get(stream_id)
                if row is not None and row.lease_owner == worker_id:
                    row.lease_expires_ms = now_ms + lease_ms
                    held.append(stream_id)
        return held

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            row = self._queue.get(stream_id)
            if row is None or row.lease_owner != worker_id:
                return
            row.lease_owner = None
            row.lease_expires_ms = 0
            if due_ms is not None:
                row.due_ms = due_ms

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        await anyio.lowlevel.checkpoint()
        wanted = set(step_ids)
        with self._lock:
            dues = [
                wake_ms(row.due_ms, row.lease_owner, row.lease_expires_ms)
                for row in self._queue.values()
                if row.step_id in wanted
            ]
            return min(dues, default=None)

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int | None:
        await anyio.lowlevel.checkpoint()
        wanted = set(step_ids)
        with self._lock:
            return sum(
                1
                for row in self._queue.values()
                if row.step_id in wanted
                and wake_ms(row.due_ms, row.lease_owner, row.lease_expires_ms) <= now_ms
            )

    # -- the inbox --------------------------------------------------------------------------
    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return self._post_locked(stream_id, kind, name, data, now_ms)

    def _post_locked(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        self._last_item_id += 1
        item = InboxItem(self._last_item_id, stream_id, kind, name, bytes(data), now_ms)
        self._inbox.setdefault(stream_id, {})[item.id] = item
        row = self._queue.get(stream_id)
        if row is not None and row.due_ms > now_ms:
            row.due_ms = now_ms
        return item.id

    async def reserve_inbox_ids(self, above: int) -> None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._last_item_id = max(self._last_item_id, above)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        await anyio.lowlevel.checkpoint()
        if limit <= 0:
            return []
        with self._lock:
            items = self._inbox.get(stream_id, {})
            return [item for item_id, item in items.items() if item_id > after_id][:limit]

    # -- published step definitions ---------------------------------------------------------
    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._definitions[step_id] = (version, bytes(data))

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return self._definitions.get(step_id)

    # -- snapshots --------------------------------------------------------------------------
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            stored = self._snapshots.get(snapshot.stream_id)
            if stored is None or stored.version <= snapshot.version:
                self._snapshots[snapshot.stream_id] = snapshot

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        await anyio.lowlevel.checkpoint()
        with self._lock:
            stored = self._snapshots.get(stream_id)
            if stored is None or (max_version is not None and stored.version > max_version):
                return None
            return stored

    # -- the global key-value store ---------------------------------------------------------
    def _kv_live(self, key: str, now_ms: int) -> KVEntry | None:
        entry = self._kv.get(key)
        return entry if entry is not None and kv_live(entry.expires_ms, now_ms) else None

    def _kv_purge(self, now_ms: int) -> None:
        """Drop the entries expired at ``now_ms`` (heap entries of overwritten ones are stale)."""
        expiries = self._kv_expiries
        while expiries and expiries[0][0] <= now_ms:
            _, key, revision = heapq.heappop(expiries)
            entry = self._kv.get(key)
            if entry is not None and entry.revision == revision:
                del self._kv[key]

    def _kv_write(self, key: str, data: bytes, now_ms: int, ttl_ms: int | None) -> KVEntry:
        self._kv_purge(now_ms)
        self._kv_revision += 1
        entry = KVEntry(key, bytes(data), self._kv_revision, kv_expires_ms(now_ms, ttl_ms))
        self._kv[key] = entry
        if entry.expires_ms is not None:
            heapq.heappush(self._kv_expiries, (entry.expires_ms, key, entry.revision))
        return entry

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return self._kv_live(key, now_ms)

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            return self._kv_write(key, data, now_ms, ttl_ms)

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            current = self._kv_live(key, now_ms)
            if (None if current is None else current.revision) != expected_revision:
                return None
            return self._kv_write(key, data, now_ms, ttl_ms)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        await anyio.lowlevel.checkpoint()
        with self._lock:
            self._kv.pop(key, None)
            self._kv_purge(now_ms)

    async def kv_scan(
        self, now_ms: int, cursor: str = "", limit: int = 1000
    ) -> tuple[list[KVEntry], str]:
        check_kv_scan(now_ms, limit)
        await anyio.lowlevel.checkpoint()
        with self._lock:  # in key order; the cursor is the last key handed out
            keys = sorted(k for k in self._kv if k > cursor and self._kv_live(k, now_ms))
            page = [self._kv[k] for k in keys[:limit]]
        return page, page[-1].key if len(keys) > limit else ""
