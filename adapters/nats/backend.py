"""The distributed backend's face: :class:`NatsBackend`, the storage port over its parts.

Each part is an object of its own around one :class:`~.connection.NatsConnection` and the
:class:`~.jetstream.JetStream` API above it: the log (:mod:`.log`), the work queue
(:mod:`.queue`), the inboxes (:mod:`.inbox`), definitions and snapshots (:mod:`.meta`) and
the global key-value store (:mod:`.kv`). The backend hands each call to the part that owns
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepsource.adapters.nats.connection import NatsConnection
from stepsource.adapters.nats.inbox import NatsInbox
from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.kv import NatsKV
from stepsource.adapters.nats.log import NatsLog
from stepsource.adapters.nats.meta import NatsMeta
from stepsource.adapters.nats.queue import NatsQueue
from stepsource.adapters.nats.wire import NatsOptions, parse_nats_url
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)

__all__ = ["NatsBackend"]


class NatsBackend(Backend):
    """Event streams, inboxes, work queue, definitions and snapshots on NATS JetStream.

    Nothing connects at construction: the first call (or :meth:`open`) connects, creates
    or validates the streams and buckets, and reads the server's ``max_payload``.
    :meth:`aclose` closes the connection; the next call reconnects. One object serves
    one asyncio event loop at a time (a call from another loop reconnects there).
    """

    def __init__(
        self,
        options: NatsOptions,
        *,
        request_timeout: float = 2.0,
        operation_timeout: float = 30.0,
    ) -> None:
        self.connection = NatsConnection(
            options, request_timeout=request_timeout, operation_timeout=operation_timeout
        )
        self.js = JetStream(self.connection)
        self.queue = NatsQueue(self.js)
        self.inboxes = NatsInbox(self.js, self.queue)
        self.log = NatsLog(self.js, self.queue, self.inboxes)
        self.meta = NatsMeta(self.js)
        self.kv = NatsKV(self.js)

    @classmethod
    def from_url(cls, url: str) -> NatsBackend:
        return cls(parse_nats_url(url))

    @property
    def options(self) -> NatsOptions:
        return self.connection.options

    @property
    def request_timeout(self) -> float:
        return self.connection.request_timeout

    @property
    def operation_timeout(self) -> float:
        return self.connection.operation_timeout

    @property
    def max_commit_bytes(self) -> int:
        return self.connection.max_commit_bytes

    @max_commit_bytes.setter
    def max_commit_bytes(self, value: int) -> None:
        self.connection.max_commit_bytes = value

    def __repr__(self) -> str:
        return (
            f"NatsBackend(servers={list(self.options.servers)}, stream={self.js.layout.events!r})"
        )

    async def open(self) -> None:
        await self.connection.guard(self.connection.client(), "connect")

    async def aclose(self) -> None:
        await self.connection.close(self._stop_in_flight)

    async def _stop_in_flight(self) -> None:
        self.log.forget()
        await self.queue.drop_checks()

    async def stream_info(self) -> dict[str, Any]:
        """The event log's JetStream stream info (config, state, and on a cluster the
        ``cluster`` section naming its leader and replicas), as the server reports it."""
        return await self.js.stream_info()

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
        return await self.inboxes.post(stream_id, kind, name, data, now_ms)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        return await self.inboxes.read(stream_id, after_id, limit)

    async def reserve_inbox_ids(self, above: int) -> None:
        await self.inboxes.reserve_ids(above)

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
