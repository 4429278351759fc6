"""The Redis backend's global key-value store: one hash per key (``P:kv:<key>``).

Each entry holds its data, its revision and, with a TTL, its expiry in the caller's epoch
milliseconds. Revisions come from one counter (``INCR P:kvrev``), so a key deleted or expired
and written again never gets back a revision it had. Writes are one script run each: a
compare-and-set reads the live revision and writes in the same atomic step.

**TTL.** Whether an entry is live is judged against the caller's ``now_ms``, exactly as the
storage port says (the engine owns time). The server also expires the key natively
(``PEXPIRE``) :data:`NATIVE_TTL_GRACE_MS` after its TTL, so expired entries do not pile up;
the grace covers clock differences between the engine's hosts and the server, which must
stay below it.
"""

from __future__ import annotations

import re

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_scan,
    check_kv_write,
    kv_expires_ms,
    kv_live,
)
from stepsource.adapters.ports import KVEntry
from stepsource.adapters.redis.connection import Arg, RedisConnection, to_bytes
from stepsource.adapters.redis.scripts import KV_WRITE

__all__ = ["NATIVE_TTL_GRACE_MS", "RedisKV"]

#: how long after its TTL the server removes an expired entry (clock skew allowance)
NATIVE_TTL_GRACE_MS = 60_000
_NATIVE_TTL_MAX_MS = 2**45  # beyond this (about 1,100 years) the key is left without one


def native_ttl_ms(ttl_ms: int | None) -> int | None:
    """The ``PEXPIRE`` the server applies to an entry written with ``ttl_ms`` (or None)."""
    if ttl_ms is None:
        return None
    ttl = ttl_ms + NATIVE_TTL_GRACE_MS
    return ttl if ttl <= _NATIVE_TTL_MAX_MS else None


class RedisKV:
    """Get, put, compare-and-set and delete global key-value entries."""

    def __init__(self, conn: RedisConnection, max_commit_bytes: int) -> None:
        self.conn = conn
        self.keys = conn.keys
        self.max_commit_bytes = max_commit_bytes

    async def get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        data, revision, expires = await self.conn.hmget(
            self.keys.kv(key), ["d", "r", "x"], "read a key-value entry"
        )
        if revision is None:
            return None
        expires_ms = None if expires is None else int(expires)
        if not kv_live(expires_ms, now_ms):
            return None
        return KVEntry(key, data or b"", int(revision), expires_ms)

    async def _write(
        self, key: str, expected: str, data: bytes, now_ms: int, ttl_ms: int | None
    ) -> KVEntry | None:
        expires = kv_expires_ms(now_ms, ttl_ms)
        native = native_ttl_ms(ttl_ms)
        args: list[Arg] = [
            key,
            expected,
            now_ms,
            bytes(data),
            "" if expires is None else expires,
            "" if native is None else native,
        ]
        revision = await self.conn.run(KV_WRITE, args, "write a key-value entry")
        if revision is None:
            return None
        return KVEntry(key, bytes(data), int(revision), expires)

    async def put(self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        entry = await self._write(key, "any", data, now_ms, ttl_ms)
        assert entry is not None  # an unconditional write is never refused
        return entry

    async def compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        expected = "" if expected_revision is None else str(expected_revision)
        return await self._write(key, expected, data, now_ms, ttl_ms)

    async def delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        client = await self.conn.client()
        async with self.conn.guard("delete a key-value entry"):
            await client.delete(self.keys.kv(key))

    async def scan(self, now_ms: int, cursor: str, limit: int) -> tuple[list[KVEntry], str]:
        """A page of ``SCAN`` over the entries' hashes (the cursor is the server's; a key may
        come twice over a scan, as ``SCAN`` promises no better)."""
        check_kv_scan(now_ms, limit)
        head = self.keys.kv("")
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", head) + "*"
        client = await self.conn.client()
        async with self.conn.guard("scan the key-value entries"):
            after, names = await client.scan(int(cursor or 0), match=pattern, count=limit)
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hmget(name, ["d", "r", "x"])
            rows = await pipe.execute() if names else []
        page = []
        for name, (data, revision, expires) in zip(names, rows, strict=True):
            expires_ms = None if expires is None else int(expires)
            if revision is not None and kv_live(expires_ms, now_ms):
                key = to_bytes(name).decode()[len(head) :]
                page.append(KVEntry(key, to_bytes(data or b""), int(revision), expires_ms))
        return page, "" if int(after) == 0 else str(int(after))
