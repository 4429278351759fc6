"""The Redis backend: event streams, inboxes, the work queue, global key-value state,
definitions and snapshots on one Redis server (the ``redis`` extra; see docs/redis.md).

:class:`RedisBackend` implements the storage port by composing its parts around one
:class:`~stepsource.adapters.redis.connection.RedisConnection`: the log
(:class:`~stepsource.adapters.redis.log.RedisLog`, group commit of server-side commit
scripts), the queue (:class:`~stepsource.adapters.redis.queue.RedisQueue`), the inbox
(:class:`~stepsource.adapters.redis.inbox.RedisInbox`), the key-value store
(:class:`~stepsource.adapters.redis.kv.RedisKV`) and definitions with snapshots
(:class:`~stepsource.adapters.redis.meta.RedisMeta`). The keys are listed in
:mod:`~stepsource.adapters.redis.keys`.

Durability: an acknowledged commit survives a server crash only if the server runs with
``appendonly yes`` and ``appendfsync always``; the connection reads both at connect and
warns, or with ``?durability=strict`` refuses, when they promise less.

redis-py's asyncio API is asyncio-only: under trio every call raises UsageError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)
from stepsource.adapters.redis.connection import RedisConnection
from stepsource.adapters.redis.inbox import RedisInbox
from stepsource.adapters.redis.kv import RedisKV
from stepsource.adapters.redis.log import RedisLog
from stepsource.adapters.redis.meta import RedisMeta
from stepsource.adapters.redis.options import RedisOptions, parse_redis_url
from stepsource.adapters.redis.queue import RedisQueue
from stepsource.adapters.redis.wake import RedisWakeups

__all__ = ["RedisBackend"]


class RedisBackend(Backend):
    """The storage port on Redis. Nothing connects at construction: the first call (or
    :meth:`open`) does; :meth:`aclose` closes, and the next call connects again."""

    max_commit_bytes = 64 * 1024 * 1024
    leases_in_commit = True
    dense_positions = True

    def __init__(self, options: RedisOptions, *, socket_timeout: float = 30.0) -> None:
        self.options = options
        self.conn = RedisConnection(options, socket_timeout=socket_timeout)
        self.log = RedisLog(self.conn, self.max_commit_bytes)
        self.queue = RedisQueue(self.conn)
        self.inbox_store = RedisInbox(self.conn, self.max_commit_bytes)
        self.kv = RedisKV(self.conn, self.max_commit_bytes)
        self.meta = RedisMeta(self.conn)
        self.wakeups = RedisWakeups(self.conn)

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        return cls(parse_redis_url(url))

    def __repr__(self) -> str:
        return f"RedisBackend({self.options.url!r})"

    def readmodel_path(self) -> str | None:
        """The ``readmodels=`` file of the URL, else None: an in-memory index caught up
        from the log when an engine starts (never a file in the working directory)."""
        return self.options.readmodels

    async def open(self) -> None:
        await self.conn.client()

    async def aclose(self) -> None:
        await self.conn.aclose()

    async def watch(
        self,
        on_work: Callable[[], None],
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """Wake-ups published by the server (see :mod:`~stepsource.adapters.redis.wake`)."""
        await self.wakeups.watch(on_work, on_change, task_status=task_status)

    # -- the log ----------------------------------------------------------------------------
    async def append(self, commit: Commit) -> int:
        return await self.log.append(commit)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        return await self.log.read_stream(stream_id, from_version, to_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self.log.read_all(after_position, limit)

    async def stream_version(self, stream_id: str) -> int:
        return await self.log.stream_version(stream_id)

    async def max_position(self) -> int:
        return await self.log.max_position()

    # -- the work queue ---------------------------------------------------------------------
    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        return await self.queue.lease(worker_id, step_ids, now_ms, lease_ms, limit)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        return await self.queue.renew(worker_id, stream_ids, now_ms, lease_ms)

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self.queue.release(worker_id, stream_id, due_ms)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        return await self.queue.next_due_ms(step_ids)

    # -- the inbox --------------------------------------------------------------------------
    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        return await self.inbox_store.post(stream_id, kind, name, data, now_ms)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        return await self.inbox_store.inbox(stream_id, after_id, limit)

    async def reserve_inbox_ids(self, above: int) -> None:
        await self.inbox_store.reserve_ids(above)

    # -- published step definitions and snapshots -------------------------------------------
    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        await self.meta.publish_definition(step_id, version, data)

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        return await self.meta.published_definition(step_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.meta.save_snapshot(snapshot)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        return await self.meta.latest_snapshot(stream_id, max_version)

    # -- the global key-value store ---------------------------------------------------------
    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        return await self.kv.get(key, now_ms)

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        return await self.kv.put(key, data, now_ms, ttl_ms)

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        return await self.kv.compare_and_set(key, expected_revision, data, now_ms, ttl_ms)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        await self.kv.delete(key, now_ms)

    async def kv_scan(
        self, now_ms: int, cursor: str = "", limit: int = 1000
    ) -> tuple[list[KVEntry], str]:
        return await self.kv.scan(now_ms, cursor, limit)
