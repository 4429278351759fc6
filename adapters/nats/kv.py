"""The NATS backend's global key-value store: the bucket ``NAME_kv``, one key per entry,
each entry's expiry (epoch ms) in a header; a key's revision is its message's sequence.

A compare-and-set reads the key's last message, judges it, and publishes only if that
message is still the key's last (``Nats-Expected-Last-Subject-Sequence``), so no other
writer can come between.
"""

from __future__ import annotations

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_scan,
    check_kv_write,
    kv_expires_ms,
    kv_live,
)
from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.wire import EXPIRES_HEADER, decode_token
from stepsource.adapters.ports import KVEntry

__all__ = ["NatsKV"]


class NatsKV:
    """Reads, writes, compare-and-sets and deletes of global-scope state."""

    def __init__(self, js: JetStream) -> None:
        self.js = js
        self.connection = js.connection
        self.layout = js.layout

    async def _kv_current(self, key: str) -> tuple[int, KVEntry | None]:
        """The key's last message (its sequence, 0 if none) and its entry (None if deleted);
        expiry is the caller's to judge."""
        stored = await self.js.get(
            self.layout.kv_stream, {"last_by_subj": self.layout.kv_subject(key)}
        )
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
        subject = self.layout.kv_subject(key)
        if expect is None:
            revision: int | None = await self.js.publish(subject, bytes(data), headers)
        else:
            revision = await self.js.publish_if(
                self.layout.kv_stream, subject, bytes(data), headers, expect
            )
        return None if revision is None else KVEntry(key, bytes(data), revision, expires)

    async def get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        _, entry = await self.connection.guard(self._kv_current(key), "read a key-value entry")
        if entry is None or not kv_live(entry.expires_ms, now_ms):
            return None
        return entry

    async def put(self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.connection.max_commit_bytes)
        entry = await self.connection.guard(
            self._kv_write(key, data, now_ms, ttl_ms, None), "write a key-value entry"
        )
        assert entry is not None
        return entry

    async def compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(
            key, data, now_ms, ttl_ms, self.connection.max_commit_bytes, expected_revision
        )
        result: KVEntry | None = await self.connection.guard(
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

    async def delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        await self.connection.guard(self._kv_delete(key), "delete a key-value entry")

    async def _kv_delete(self, key: str) -> None:
        _, entry = await self._kv_current(key)
        if entry is not None:
            await self.js.publish(self.layout.kv_subject(key), b"", {"KV-Operation": "DEL"})

    async def scan(self, now_ms: int, cursor: str, limit: int) -> tuple[list[KVEntry], str]:
        """A page in the bucket's stream order (the cursor is the next sequence to read): the
        bucket keeps one message a key, its last."""
        check_kv_scan(now_ms, limit)
        start = int(cursor) if cursor else 1
        batch, more = await self.connection.guard(
            self.js.batch(self.layout.kv_stream, {"seq": start, "batch": limit}),
            "scan the key-value entries",
        )
        prefix = f"$KV.{self.layout.kv_bucket}."
        page = []
        for stored in batch:
            if stored.headers.get("KV-Operation") in ("DEL", "PURGE"):
                continue
            expires = stored.headers.get(EXPIRES_HEADER)
            expires_ms = None if expires is None else int(expires)
            if kv_live(expires_ms, now_ms):
                key = decode_token(stored.subject.removeprefix(prefix))
                page.append(KVEntry(key, stored.data, stored.seq, expires_ms))
        return page, str(batch[-1].seq + 1) if batch and more else ""
