"""The NATS backend's published step definitions, snapshots and global key-value store.

The next layer of :class:`~stepsource.adapters.nats.NatsBackend`'s mixins, above
:class:`~stepsource.adapters.nats_stores.NatsStores` (whose transport methods it uses): one
bucket for definitions and snapshots, one for the global key-value store.
"""

from __future__ import annotations

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_write,
    kv_expires_ms,
    kv_live,
)
from stepsource.adapters.nats_stores import NatsStores
from stepsource.adapters.nats_wire import (
    EXPIRES_HEADER,
    Stored,
    decode_definition,
    decode_snapshot,
    encode_definition,
    encode_snapshot,
    encode_token,
)
from stepsource.adapters.ports import KVEntry, Snapshot
from stepsource.errors import CorruptLogError, LimitExceededError

__all__ = ["NatsMeta"]


class NatsMeta(NatsStores):
    """Definitions, snapshots and global state on top of the queue and inbox mixin."""

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
