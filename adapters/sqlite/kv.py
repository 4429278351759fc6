"""The global key-value store of the SQLite backend: a ``kv`` table with TTL and revisions.

Revisions come from the one-row ``kv_sequence`` counter, so a key deleted (or expired and
purged) and written again never gets back an old revision. Writes take the same path as every
other non-append write: the one writer connection, one short ``BEGIN IMMEDIATE`` transaction
each (so a compare-and-set is atomic across processes); each write also purges a few rows
that expired by its ``now_ms``. Reads run on reader connections and skip expired rows.
"""

from __future__ import annotations

import sqlite3

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_scan,
    check_kv_write,
    kv_expires_ms,
    kv_live,
)
from stepsource.adapters.ports import KVEntry
from stepsource.adapters.sqlite.connection import SQLiteConnection

__all__ = ["SQLiteKV"]

_KV_PURGE = 64  # expired kv rows each write deletes at most (purging stays a short job)


class SQLiteKV:
    """The ``kv`` table, read and written through the backend's connection owner."""

    def __init__(self, connection: SQLiteConnection) -> None:
        self.connection = connection

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

    async def get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        return await self.connection.read(lambda conn: self._kv_row(conn, key, now_ms))

    async def put(self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.connection.max_commit_bytes)
        value = bytes(data)
        return await self.connection.write(
            lambda conn: self._kv_write(conn, key, value, now_ms, ttl_ms)
        )

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
        value = bytes(data)

        def body(conn: sqlite3.Connection) -> KVEntry | None:
            current = self._kv_row(conn, key, now_ms)  # under BEGIN IMMEDIATE: nobody races
            if (None if current is None else current.revision) != expected_revision:
                return None  # refused: the transaction commits having written nothing
            return self._kv_write(conn, key, value, now_ms, ttl_ms)

        return await self.connection.write(body)

    async def delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            conn.execute(
                "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_ms <= ? LIMIT ?)",
                (now_ms, _KV_PURGE),
            )

        await self.connection.write(body)

    async def scan(self, now_ms: int, cursor: str, limit: int) -> tuple[list[KVEntry], str]:
        """A page in key order (the cursor is the last key handed out)."""
        check_kv_scan(now_ms, limit)
        rows = await self.connection.read(
            lambda conn: conn.execute(
                "SELECT key, data, revision, expires_ms FROM kv WHERE key > ? "
                "AND (expires_ms IS NULL OR expires_ms > ?) ORDER BY key LIMIT ?",
                (cursor, now_ms, limit + 1),
            ).fetchall()
        )
        page = [KVEntry(k, bytes(d), int(r), x) for k, d, r, x in rows[:limit]]
        return page, page[-1].key if len(rows) > limit else ""
