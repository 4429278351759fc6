"""The global key-value store of the SQLite backend: a ``kv`` table with TTL and revisions.

Mixed into :class:`~stepsource.adapters.sqlite.SQLiteBackend`, whose single writer connection
and reader pool it uses (``_write``/``_read``): a compare-and-set runs inside the writer's
``BEGIN IMMEDIATE`` transaction, so no other process can race it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from stepsource.adapters._rules import check_kv_key, check_kv_write, kv_expires_ms, kv_live
from stepsource.adapters.ports import KVEntry

__all__ = ["SQLiteKVStore"]

T = TypeVar("T")
_KV_PURGE = 64  # expired kv rows each write deletes at most (purging stays a short job)


class SQLiteKVStore:
    max_commit_bytes: int

    async def _read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    async def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    # -- the global key-value store ---------------------------------------------------------
    @staticmethod
    def _kv_write(
        conn: sqlite3.Connection, key: str, data: bytes, now_ms: int, ttl_ms: int | None
    ) -> KVEntry:
        """Purge a few expired rows, take the next revision and write the key (in a
        transaction)."""
        conn.execute(
            "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_ms <= ? LIMIT ?)",
            (now_ms, _KV_PURGE),
        )
        conn.execute(
            "INSERT INTO kv_sequence (id, revision) VALUES (0, 1) "
            "ON CONFLICT (id) DO UPDATE SET revision = revision + 1"
        )
        (revision,) = conn.execute("SELECT revision FROM kv_sequence WHERE id = 0").fetchone()
        entry = KVEntry(key, data, int(revision), kv_expires_ms(now_ms, ttl_ms))
        conn.execute(
            "INSERT INTO kv (key, data, revision, expires_ms) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET data = excluded.data, "
            "revision = excluded.revision, expires_ms = excluded.expires_ms",
            (key, data, entry.revision, entry.expires_ms),
        )
        return entry

    @staticmethod
    def _kv_row(conn: sqlite3.Connection, key: str, now_ms: int) -> KVEntry | None:
        row = conn.execute(
            "SELECT data, revision, expires_ms FROM kv WHERE key = ?", (key,)
        ).fetchone()
        if row is None or not kv_live(row[2], now_ms):
            return None
        return KVEntry(key, bytes(row[0]), int(row[1]), row[2])

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        return await self._read(lambda conn: self._kv_row(conn, key, now_ms))

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        value = bytes(data)
        return await self._write(lambda conn: self._kv_write(conn, key, value, now_ms, ttl_ms))

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        value = bytes(data)

        def body(conn: sqlite3.Connection) -> KVEntry | None:
            current = self._kv_row(conn, key, now_ms)  # under BEGIN IMMEDIATE: nobody races
            if (None if current is None else current.revision) != expected_revision:
                return None  # refused: the transaction commits having written nothing
            return self._kv_write(conn, key, value, now_ms, ttl_ms)

        return await self._write(body)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            conn.execute(
                "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_ms <= ? LIMIT ?)",
                (now_ms, _KV_PURGE),
            )

        await self._write(body)
