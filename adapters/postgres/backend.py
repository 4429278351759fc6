"""The PostgreSQL backend: one :class:`~stepsource.adapters.postgres.pool.Pool` of
connections and the parts composed around it — the event log with its group commit
(:mod:`.log`, :mod:`.commits`), the work queue and inbox (:mod:`.queue`), the global
key-value store (:mod:`.kv`), definitions and snapshots (:mod:`.meta`), and wake-ups
between processes over ``LISTEN/NOTIFY`` (:mod:`.wakeups`).

Every table lives in the URL's schema (``?schema=NAME``, default ``stepsource``), created on
first use; several applications (or test runs) share one database through distinct schemas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    ReadModelStore,
    ReadModelTable,
    RecordedEvent,
    Snapshot,
)
from stepsource.adapters.postgres.kv import KeyValueStore
from stepsource.adapters.postgres.log import EventLog
from stepsource.adapters.postgres.meta import MetaStore
from stepsource.adapters.postgres.options import PostgresOptions, parse_postgres_url
from stepsource.adapters.postgres.pool import Conn, Pool
from stepsource.adapters.postgres.queue import WorkQueue
from stepsource.adapters.postgres.readmodels import PostgresReadModelStore
from stepsource.adapters.postgres.wakeups import Wakeups

__all__ = ["PostgresBackend"]


class PostgresBackend(Backend):
    """Event streams, inboxes, work queue, definitions, snapshots and global key-value state
    in one PostgreSQL schema. asyncio only (psycopg's async driver)."""

    max_commit_bytes = 64 * 1024 * 1024
    leases_in_commit = True
    dense_positions = True

    def __init__(self, options: PostgresOptions) -> None:
        self.options = options
        self.pool = Pool(options)
        self.log = EventLog(self.pool, self.max_commit_bytes)
        self.queue = WorkQueue(self.pool, self.max_commit_bytes)
        self.kv = KeyValueStore(self.pool, self.max_commit_bytes)
        self.meta = MetaStore(self.pool)
        self.wakeups = Wakeups(self.pool)

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        return cls(parse_postgres_url(url))

    def __repr__(self) -> str:
        return f"PostgresBackend({self.options.where()})"

    @property
    def commits_written(self) -> int:
        """Append transactions this object committed (a group commit counts once)."""
        return self.log.transactions

    def joined_transaction(self, what: str) -> AbstractAsyncContextManager[Conn]:
        """A transaction on one connection that this task's appends (and every other call
        of this backend from this task) join until the block ends: the transactional steps'
        (``ctx.transaction``). Committed when the block ends, rolled back if it raises."""
        return self.pool.joined_transaction(what)

    def readmodel_store(self, table: ReadModelTable) -> ReadModelStore:
        """Read models live in this database (see :mod:`.readmodels`): any process queries
        the same rows, and no local file is kept."""
        return PostgresReadModelStore(self.options, table, self.pool.translate)

    async def open(self) -> None:
        await self.pool.open()

    async def watch(
        self,
        on_work: Callable[[], None],
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """``LISTEN/NOTIFY``: see :mod:`stepsource.adapters.postgres.wakeups`. A notice names
        no execution: it wakes every waiting handle (``on_change("")``), and the workers too
        when it tells of new work."""

        def work() -> None:
            on_work()
            on_change("")

        task_status.started()
        await self.wakeups.watch(work, lambda: on_change(""))

    async def aclose(self) -> None:
        await self.pool.aclose()

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

    # -- the work queue and the inbox -------------------------------------------------------
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

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int | None:
        return await self.queue.queue_depth(step_ids, now_ms)

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        return await self.queue.post(stream_id, kind, name, data, now_ms)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        return await self.queue.inbox(stream_id, after_id, limit)

    async def reserve_inbox_ids(self, above: int) -> None:
        await self.queue.reserve_inbox_ids(above)

    # -- definitions and snapshots ----------------------------------------------------------
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
        return await self.kv.kv_get(key, now_ms)

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        return await self.kv.kv_put(key, data, now_ms, ttl_ms)

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        return await self.kv.kv_compare_and_set(key, expected_revision, data, now_ms, ttl_ms)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        await self.kv.kv_delete(key, now_ms)

    async def kv_scan(
        self, now_ms: int, cursor: str = "", limit: int = 1000
    ) -> tuple[list[KVEntry], str]:
        return await self.kv.kv_scan(now_ms, cursor, limit)
