"""The NATS backend's work queue, inbox, definitions, snapshots and global key-value store.

A mixin of :class:`~stepsource.adapters.nats.NatsBackend`, kept apart to keep each file to
one job; it talks to JetStream only through the transport methods the backend provides
(declared abstract here), so it never touches the driver. See :mod:`stepsource.adapters.nats`
for the layout and for why the parts that are not atomic with a commit are safe.
"""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_write,
    check_post,
    kv_expires_ms,
    kv_live,
    queued_due_ms,
    wake_ms,
)
from stepsource.adapters.nats_wire import (
    BATCH,
    EXPIRES_HEADER,
    WRONG_LAST,
    JsError,
    QueueRow,
    Stored,
    Transient,
    decode_definition,
    decode_inbox_item,
    decode_row,
    decode_snapshot,
    decode_token,
    encode_definition,
    encode_inbox_item,
    encode_row,
    encode_snapshot,
    encode_token,
)
from stepsource.adapters.ports import Commit, InboxItem, KVEntry, Lease, Snapshot
from stepsource.errors import CorruptLogError, LimitExceededError

__all__ = ["NatsStores"]

T = TypeVar("T")


class NatsStores(abc.ABC):
    """Queue, inbox, meta and key-value buckets over an abstract JetStream transport."""

    max_commit_bytes: int
    operation_timeout: float
    _events: str
    _inbox: str
    _queue_bucket: str
    _meta_bucket: str
    _kv_bucket: str
    _rows: dict[str, tuple[int, QueueRow | None]]  # the queue mirror: revision, row
    _rows_seen: int  # the queue bucket's stream sequence the mirror has read up to

    # -- the transport (the backend's) ------------------------------------------------------
    @abc.abstractmethod
    def _where(self) -> str:
        """The servers, for messages."""

    @abc.abstractmethod
    async def _guard(self, work: Awaitable[T], what: str) -> T:
        """Await ``work``, translating what escapes into the error tree."""

    @abc.abstractmethod
    async def _api(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """A JetStream API call."""

    @abc.abstractmethod
    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], *, retry: bool = True
    ) -> int:
        """Publish into a stream; the message's sequence."""

    @abc.abstractmethod
    async def _get(self, stream: str, body: dict[str, Any]) -> Stored | None:
        """One message, as current as every acknowledged write."""

    @abc.abstractmethod
    async def _batch(self, stream: str, body: dict[str, Any]) -> tuple[list[Stored], bool]:
        """A batched direct get, and whether more messages match."""

    async def _publish_if(
        self, stream: str, subject: str, payload: bytes, headers: dict[str, str], expect: int
    ) -> int | None:
        """Publish only if the subject's last message is still ``expect`` (0: none); the new
        sequence, or None if another write came first. A retry after a lost ack that is
        refused reads the subject back: if its last message is ours, the write happened."""
        msg_id = uuid.uuid4().hex
        headers = {
            **headers,
            "Nats-Msg-Id": msg_id,
            "Nats-Expected-Last-Subject-Sequence": str(expect),
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay, unsure = 0.02, False
        while True:
            try:
                return await self._publish(subject, payload, headers, retry=False)
            except JsError as exc:
                if exc.err_code not in WRONG_LAST:
                    raise
                if unsure:
                    last = await self._get(stream, {"last_by_subj": subject})
                    if last is not None and last.headers.get("Nats-Msg-Id") == msg_id:
                        return last.seq
                return None
            except Transient:
                unsure = True
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- the work queue ---------------------------------------------------------------------
    def _row_subject(self, stream_id: str) -> str:
        return f"$KV.{self._queue_bucket}.{encode_token(stream_id)}"

    def _mirror(self, stream_id: str, revision: int, row: QueueRow | None) -> None:
        known = self._rows.get(stream_id)
        if known is None or known[0] < revision:
            self._rows[stream_id] = (revision, row)

    @staticmethod
    def _row_of(stored: Stored) -> QueueRow | None:
        if stored.headers.get("KV-Operation") in ("DEL", "PURGE") or not stored.data:
            return None
        try:
            return decode_row(stored.data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptLogError(
                f"the queue entry {stored.subject} is not a stepsource queue row ({exc})",
                hint="something else wrote into this bucket: use another ?stream= name",
            ) from None

    async def _fetch_row(self, stream_id: str) -> tuple[int, QueueRow | None] | None:
        """The execution's queue row and revision as the server has it now (or None)."""
        stored = await self._get(
            f"KV_{self._queue_bucket}", {"last_by_subj": self._row_subject(stream_id)}
        )
        if stored is None:
            return None
        row = self._row_of(stored)
        self._mirror(stream_id, stored.seq, row)
        return stored.seq, row

    async def _sync_queue(self) -> None:
        """Catch the mirror up with every queue change since it last looked."""
        prefix = f"$KV.{self._queue_bucket}."
        while True:
            batch, more = await self._batch(
                f"KV_{self._queue_bucket}", {"seq": self._rows_seen + 1, "batch": BATCH}
            )
            for stored in batch:
                self._mirror(
                    decode_token(stored.subject.removeprefix(prefix)),
                    stored.seq,
                    self._row_of(stored),
                )
                self._rows_seen = max(self._rows_seen, stored.seq)
            if not batch or not more:
                return

    async def _put_row(
        self, stream_id: str, row: QueueRow | None, expect: int | None
    ) -> int | None:
        """Write (or, with None, delete) the row; with ``expect``, only if the row's revision
        is still that (0: no row). The new revision, or None if another write came first."""
        headers = {"KV-Operation": "DEL"} if row is None else {}
        subject = self._row_subject(stream_id)
        payload = b"" if row is None else encode_row(row)
        if expect is None:
            revision: int | None = await self._publish(subject, payload, headers)
        else:
            revision = await self._publish_if(
                f"KV_{self._queue_bucket}", subject, payload, headers, expect
            )
        if revision is not None:
            self._mirror(stream_id, revision, row)
        return revision

    async def _current(self, stream_id: str) -> tuple[int, QueueRow | None]:
        """The mirrored row (a guess for compare-and-set), else the server's."""
        known = self._rows.get(stream_id)
        if known is not None:
            return known
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        wanted = set(step_ids)
        if not wanted or limit <= 0:
            return []
        result: list[Lease] = await self._guard(
            self._lease(worker_id, wanted, now_ms, lease_ms, limit), "lease executions"
        )
        return result

    async def _lease(
        self, worker_id: str, wanted: set[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        await self._sync_queue()
        candidates = sorted(
            (-row.priority, row.due_ms, stream_id)
            for stream_id, (_, row) in self._rows.items()
            if row is not None and row.step_id in wanted and row.runnable(now_ms)
        )
        leases: list[Lease] = []
        expires = now_ms + lease_ms
        for _, _, stream_id in candidates:
            if len(leases) >= limit:
                break
            revision, row = self._rows[stream_id]
            while row is not None and row.step_id in wanted and row.runnable(now_ms):
                mine = replace(row, lease_owner=worker_id, lease_expires_ms=expires)
                if await self._put_row(stream_id, mine, revision) is not None:
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
                revision, row = await self._current_after_miss(stream_id)
                if row == mine:  # our own write, whose ack was lost
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
        return leases

    async def _current_after_miss(self, stream_id: str) -> tuple[int, QueueRow | None]:
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        result: list[str] = await self._guard(
            self._renew(worker_id, stream_ids, now_ms, lease_ms), "renew leases"
        )
        return result

    async def _renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        held = []
        for stream_id in dict.fromkeys(stream_ids):
            revision, row = await self._current(stream_id)
            while row is not None and row.lease_owner == worker_id:
                renewed = replace(row, lease_expires_ms=now_ms + lease_ms)
                if row == renewed or await self._put_row(stream_id, renewed, revision):
                    held.append(stream_id)
                    break
                revision, row = await self._current_after_miss(stream_id)
        return held

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self._guard(self._release(worker_id, stream_id, due_ms), "release a lease")

    async def _release(self, worker_id: str, stream_id: str, due_ms: int | None) -> None:
        revision, row = await self._current(stream_id)
        while row is not None and row.lease_owner == worker_id:
            free = replace(
                row,
                lease_owner=None,
                lease_expires_ms=0,
                due_ms=row.due_ms if due_ms is None else due_ms,
            )
            if await self._put_row(stream_id, free, revision) is not None:
                return
            revision, row = await self._current_after_miss(stream_id)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        wanted = set(step_ids)
        if not wanted:
            return None
        await self._guard(self._sync_queue(), "read the work queue")
        dues = [
            wake_ms(row.due_ms, row.lease_owner, row.lease_expires_ms)
            for _, row in self._rows.values()
            if row is not None and row.step_id in wanted
        ]
        return min(dues, default=None)

    async def _apply_queue(self, commit: Commit) -> None:
        update = commit.queue
        assert update is not None
        stream_id = commit.stream_id
        if update.kind == "done":
            await self._put_row(stream_id, None, None)
            return
        if update.kind == "enqueue":
            await self._put_row(
                stream_id, QueueRow(update.step_id, update.priority, update.due_ms), None
            )
            return
        revision, _ = await self._current(stream_id)  # suspend: read, look at the inbox, CAS
        while True:
            pending = await self._inbox_pending(stream_id)
            row = QueueRow(update.step_id, update.priority, queued_due_ms(update, pending))
            if await self._put_row(stream_id, row, revision) is not None:
                return
            revision, _ = await self._current_after_miss(stream_id)

    # -- the inbox --------------------------------------------------------------------------
    def _inbox_subject(self, stream_id: str) -> str:
        return f"{self._events}.in.{encode_token(stream_id)}"

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        payload = encode_inbox_item(kind, name, bytes(data), now_ms)
        result: int = await self._guard(self._post(stream_id, payload, now_ms), "post to an inbox")
        return result

    async def _post(self, stream_id: str, payload: bytes, now_ms: int) -> int:
        try:
            item_id = await self._publish(
                self._inbox_subject(stream_id), payload, {"Nats-Msg-Id": uuid.uuid4().hex}
            )
        except LimitExceededError as exc:
            raise LimitExceededError(exc.reason, execution_id=stream_id, hint=exc.hint) from None
        # touch the row even when its due time stays: a suspend racing this post then fails
        # its compare-and-set and looks at the inbox again
        fetched = await self._fetch_row(stream_id)
        revision, row = fetched if fetched is not None else (0, None)
        while row is not None:
            woken = replace(row, due_ms=min(row.due_ms, now_ms))
            if await self._put_row(stream_id, woken, revision) is not None:
                break
            revision, row = await self._current_after_miss(stream_id)
        return item_id

    async def _inbox_pending(self, stream_id: str) -> bool:
        found = await self._get(self._inbox, {"last_by_subj": self._inbox_subject(stream_id)})
        return found is not None

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        result: list[InboxItem] = await self._guard(
            self._read_inbox(stream_id, after_id, limit), "read an inbox"
        )
        return result

    async def _read_inbox(self, stream_id: str, after_id: int, limit: int) -> list[InboxItem]:
        subject = self._inbox_subject(stream_id)
        seq = max(after_id + 1, 1)
        items: list[InboxItem] = []
        while len(items) < limit:
            batch, more = await self._batch(
                self._inbox,
                {"seq": seq, "next_by_subj": subject, "batch": min(limit - len(items), BATCH)},
            )
            for stored in batch:
                try:
                    kind, name, data, posted = decode_inbox_item(stored.data)
                except ValueError as exc:
                    raise CorruptLogError(
                        f"inbox message {stored.seq} in {self._inbox} is not a stepsource "
                        f"inbox item ({exc})",
                        execution_id=stream_id,
                    ) from None
                items.append(InboxItem(stored.seq, stream_id, kind, name, data, posted))
            if not batch or not more:
                break
            seq = batch[-1].seq + 1
        return items[:limit]

    async def _delete_items(self, stream_id: str, item_ids: Sequence[int]) -> None:
        subject = self._inbox_subject(stream_id)
        for item_id in dict.fromkeys(item_ids):
            if item_id <= 0:
                continue
            stored = await self._get(self._inbox, {"seq": item_id})
            if stored is None or stored.subject != subject:
                continue  # gone already, or another execution's item
            try:
                await self._api(
                    f"$JS.API.STREAM.MSG.DELETE.{self._inbox}", {"seq": item_id, "no_erase": True}
                )
            except JsError as exc:
                if exc.code != 404 and exc.err_code not in (10037, 10057):
                    raise

    # -- published step definitions and snapshots (the meta bucket) -------------------------
    def _meta_subject(self, kind: str, identifier: str) -> str:
        return f"$KV.{self._meta_bucket}.{kind}.{encode_token(identifier)}"

    async def _meta_put(self, subject: str, payload: bytes, expect: int | None) -> bool:
        if expect is None:
            await self._publish(subject, payload, {})
            return True
        stream = f"KV_{self._meta_bucket}"
        return await self._publish_if(stream, subject, payload, {}, expect) is not None

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        payload = encode_definition(version, bytes(data))
        await self._guard(
            self._meta_put(self._meta_subject("def", step_id), payload, None),
            "publish a step definition",
        )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        stored: Stored | None = await self._guard(
            self._get(
                f"KV_{self._meta_bucket}", {"last_by_subj": self._meta_subject("def", step_id)}
            ),
            "read a step definition",
        )
        if stored is None or not stored.data:
            return None
        try:
            return decode_definition(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the published definition of {step_id!r} is damaged ({exc})"
            ) from None

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        payload = encode_snapshot(snapshot.version, snapshot.topic, bytes(snapshot.data))
        await self._guard(self._save_snapshot(snapshot, payload), "save a snapshot")

    async def _save_snapshot(self, snapshot: Snapshot, payload: bytes) -> None:
        subject = self._meta_subject("snap", snapshot.stream_id)
        while True:
            stored = await self._get(f"KV_{self._meta_bucket}", {"last_by_subj": subject})
            if stored is not None and stored.data:
                kept = self._snapshot_of(snapshot.stream_id, stored)
                if kept.version > snapshot.version:
                    return
            try:
                done = await self._meta_put(subject, payload, stored.seq if stored else 0)
            except LimitExceededError as exc:
                raise LimitExceededError(
                    exc.reason, execution_id=snapshot.stream_id, hint=exc.hint
                ) from None
            if done:
                return

    def _snapshot_of(self, stream_id: str, stored: Stored) -> Snapshot:
        try:
            version, topic, data = decode_snapshot(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the snapshot of the execution is damaged ({exc})", execution_id=stream_id
            ) from None
        return Snapshot(stream_id, version, topic, data)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        stored: Stored | None = await self._guard(
            self._get(
                f"KV_{self._meta_bucket}", {"last_by_subj": self._meta_subject("snap", stream_id)}
            ),
            "read a snapshot",
        )
        if stored is None or not stored.data:
            return None
        snapshot = self._snapshot_of(stream_id, stored)
        if max_version is not None and snapshot.version > max_version:
            return None
        return snapshot

    # -- the global key-value store (its own bucket) ----------------------------------------
    def _kv_subject(self, key: str) -> str:
        return f"$KV.{self._kv_bucket}.{encode_token(key)}"

    async def _kv_current(self, key: str) -> tuple[int, KVEntry | None]:
        """The key's last message (its sequence, 0 if none) and its entry (None if deleted);
        expiry is the caller's to judge."""
        stored = await self._get(f"KV_{self._kv_bucket}", {"last_by_subj": self._kv_subject(key)})
        if stored is None:
            return 0, None
        if stored.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return stored.seq, None
        expires = stored.headers.get(EXPIRES_HEADER)
        entry = KVEntry(key, stored.data, stored.seq, None if expires is None else int(expires))
        return stored.seq, entry

    async def _kv_write(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None, expect: int | None
    ) -> KVEntry | None:
        expires = kv_expires_ms(now_ms, ttl_ms)
        headers = {} if expires is None else {EXPIRES_HEADER: str(expires)}
        subject = self._kv_subject(key)
        if expect is None:
            revision: int | None = await self._publish(subject, bytes(data), headers)
        else:
            revision = await self._publish_if(
                f"KV_{self._kv_bucket}", subject, bytes(data), headers, expect
            )
        return None if revision is None else KVEntry(key, bytes(data), revision, expires)

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        _, entry = await self._guard(self._kv_current(key), "read a key-value entry")
        if entry is None or not kv_live(entry.expires_ms, now_ms):
            return None
        return entry

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        entry = await self._guard(
            self._kv_write(key, data, now_ms, ttl_ms, None), "write a key-value entry"
        )
        assert entry is not None
        return entry

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        result: KVEntry | None = await self._guard(
            self._kv_cas(key, expected_revision, data, now_ms, ttl_ms),
            "compare-and-set a key-value entry",
        )
        return result

    async def _kv_cas(
        self, key: str, expected: int | None, data: bytes, now_ms: int, ttl_ms: int | None
    ) -> KVEntry | None:
        last, entry = await self._kv_current(key)
        live = entry is not None and kv_live(entry.expires_ms, now_ms)
        if (expected is None and live) or (expected is not None and (not live or last != expected)):
            return None
        # the server checks the key's last message is still the one judged here
        return await self._kv_write(key, data, now_ms, ttl_ms, last)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        await self._guard(self._kv_delete(key), "delete a key-value entry")

    async def _kv_delete(self, key: str) -> None:
        _, entry = await self._kv_current(key)
        if entry is not None:
            await self._publish(self._kv_subject(key), b"", {"KV-Operation": "DEL"})
