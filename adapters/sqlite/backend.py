"""The embedded backend's face: :class:`SQLiteBackend`, the storage port over its parts.

Each part is an object of its own around the one :class:`SQLiteConnection`: the log
(:mod:`.log`, group commit, and :mod:`.commits` for what a commit writes), the work queue
(:mod:`.queue`), the inboxes (:mod:`.inbox`), the global key-value store (:mod:`.kv`), and
step definitions with snapshots (:mod:`.meta`). The backend checks its arguments and hands
each call to the part that owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)
from stepsource.adapters.sqlite.connection import SQLiteConnection
from stepsource.adapters.sqlite.inbox import SQLiteInbox
from stepsource.adapters.sqlite.kv import SQLiteKV
from stepsource.adapters.sqlite.log import SQLiteLog
from stepsource.adapters.sqlite.meta import SQLiteMeta
from stepsource.adapters.sqlite.queue import SQLiteQueue
from stepsource.errors import UsageError

__all__ = ["SQLiteBackend"]


class SQLiteBackend(Backend):
    """Event streams, inboxes, work queue, definitions and snapshots in one SQLite file (WAL).

    ``synchronous`` is ``"full"`` (an acknowledged commit survives power loss) or
    ``"normal"`` (faster; the last commits may be lost on power loss, never corrupted).
    ``busy_timeout_ms`` bounds how long a writer waits for another process's write lock.
    ``commits_written`` counts the append transactions this object committed.
    """

    leases_in_commit = True
    dense_positions = True

    def __init__(
        self, path: str, *, synchronous: str = "full", busy_timeout_ms: int = 30000
    ) -> None:
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise UsageError(
                f"SQLiteBackend needs a file path, not {path!r}",
                hint="Use MemoryBackend (memory://) for a log that lives in this process",
            )
        mode = synchronous.lower()
        if mode not in ("full", "normal"):
            raise UsageError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int):
            raise UsageError(f"busy_timeout_ms must be an int, not {busy_timeout_ms!r}")
        if not 0 <= busy_timeout_ms <= 2**31 - 1:
            raise UsageError(f"busy_timeout_ms must be 0 to 2**31 - 1, not {busy_timeout_ms}")
        level: Literal["full", "normal"] = "full" if mode == "full" else "normal"
        self.connection = SQLiteConnection(path, level, busy_timeout_ms)
        self.log = SQLiteLog(self.connection)
        self.queue = SQLiteQueue(self.connection)
        self.inboxes = SQLiteInbox(self.connection)
        self.kv = SQLiteKV(self.connection)
        self.meta = SQLiteMeta(self.connection)

    @property
    def path(self) -> str:
        return self.connection.path

    @property
    def synchronous(self) -> Literal["full", "normal"]:
        return self.connection.synchronous

    @property
    def busy_timeout_ms(self) -> int:
        return self.connection.busy_timeout_ms

    @property
    def max_commit_bytes(self) -> int:
        return self.connection.max_commit_bytes

    @max_commit_bytes.setter
    def max_commit_bytes(self, value: int) -> None:
        self.connection.max_commit_bytes = value

    @property
    def commits_written(self) -> int:
        return self.log.commits_written

    def readmodel_path(self) -> str | None:
        """The read models live beside the log, in ``<path>.readmodels``."""
        return self.path + ".readmodels"

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r}, synchronous={self.synchronous!r})"

    async def open(self) -> None:
        await self.connection.open()

    async def aclose(self) -> None:
        await self.connection.close()

    async def connection_settings(self) -> dict[str, object]:
        """The writer connection's journal mode, synchronous level and busy timeout."""
        return await self.connection.settings()

    # -- the log ----------------------------------------------------------------------------
    async def append(self, commit: Commit) -> int:
        return await self.log.append(commit)

    def append_now(self, commit: Commit) -> int | None:
        return self.log.append_now(commit)

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

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int | None:
        return await self.queue.queue_depth(step_ids, now_ms)

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
