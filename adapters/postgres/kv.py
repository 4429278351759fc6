"""The global key-value store of the PostgreSQL backend: a ``kv`` table with TTL.

Revisions come from the ``kv_revision`` sequence, so a key deleted (or expired and purged)
and written again never gets back an old revision. Each operation is one short transaction
whose conditional write is a single statement, atomic across processes in READ COMMITTED:
a compare-and-set on a revision is ``UPDATE ... WHERE revision = expected`` (a concurrent
writer's row is re-checked after it commits), and one on an absent key is ``INSERT ... ON
CONFLICT DO UPDATE ... WHERE`` the present row has expired. Each write also purges a few rows
that expired by its ``now_ms``; reads skip expired rows.
"""

from __future__ import annotations

from stepsource.adapters._rules import (
    check_kv_key,
    check_kv_scan,
    check_kv_write,
    kv_expires_ms,
    kv_live,
)
from stepsource.adapters.ports import KVEntry
from stepsource.adapters.postgres.pool import Conn, Pool

__all__ = ["KeyValueStore"]

_KV_PURGE = 64  # expired rows each write deletes at most (purging stays a short job)


class KeyValueStore:
    """The ``kv`` table and its revision sequence."""

    def __init__(self, pool: Pool, max_commit_bytes: int) -> None:
        self.pool = pool
        self.max_commit_bytes = max_commit_bytes

    async def _purge(self, conn: Conn, now_ms: int) -> None:
        s = self.pool.schema
        await conn.execute(
            f"DELETE FROM {s}.kv WHERE key IN (SELECT key FROM {s}.kv WHERE expires_ms <= %s "
            "LIMIT %s FOR UPDATE SKIP LOCKED)",
            (now_ms, _KV_PURGE),
        )

    async def _write(self, sql: str, params: dict[str, object], now_ms: int) -> int | None:
        """Purge, then run one conditional write returning the new revision (None: refused)."""

        async def body(conn: Conn) -> int | None:
            await self._purge(conn, now_ms)
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone()
            return None if row is None else int(row[0])

        return await self.pool.transaction(body, "write a key-value entry")

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        s = self.pool.schema

        async def body(conn: Conn) -> KVEntry | None:
            cursor = await conn.execute(
                f"SELECT data, revision, expires_ms FROM {s}.kv WHERE key = %s", (key,)
            )
            row = await cursor.fetchone()
            if row is None or not kv_live(row[2], now_ms):
                return None
            return KVEntry(key, bytes(row[0]), int(row[1]), row[2])

        return await self.pool.read(body, "read a key-value entry")

    def _params(self, key: str, data: bytes, now_ms: int, ttl_ms: int | None) -> dict[str, object]:
        return {
            "key": key,
            "data": bytes(data),
            "now": now_ms,
            "expires": kv_expires_ms(now_ms, ttl_ms),
        }

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        s = self.pool.schema
        revision = await self._write(
            f"INSERT INTO {s}.kv (key, data, revision, expires_ms) VALUES (%(key)s, %(data)s, "
            f"nextval('{s}.kv_revision'), %(expires)s) ON CONFLICT (key) DO UPDATE SET "
            "data = excluded.data, revision = excluded.revision, "
            "expires_ms = excluded.expires_ms RETURNING revision",
            self._params(key, data, now_ms, ttl_ms),
            now_ms,
        )
        assert revision is not None
        return KVEntry(key, bytes(data), revision, kv_expires_ms(now_ms, ttl_ms))

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        s = self.pool.schema
        params = self._params(key, data, now_ms, ttl_ms)
        if expected_revision is None:  # only if absent or expired
            sql = (
                f"INSERT INTO {s}.kv (key, data, revision, expires_ms) VALUES (%(key)s, "
                f"%(data)s, nextval('{s}.kv_revision'), %(expires)s) ON CONFLICT (key) DO "
                "UPDATE SET data = excluded.data, revision = excluded.revision, "
                f"expires_ms = excluded.expires_ms WHERE {s}.kv.expires_ms <= %(now)s "
                "RETURNING revision"
            )
        else:
            params["expected"] = expected_revision
            sql = (
                f"UPDATE {s}.kv SET data = %(data)s, revision = nextval('{s}.kv_revision'), "
                "expires_ms = %(expires)s WHERE key = %(key)s AND revision = %(expected)s "
                "AND (expires_ms IS NULL OR expires_ms > %(now)s) RETURNING revision"
            )
        revision = await self._write(sql, params, now_ms)
        if revision is None:
            return None
        return KVEntry(key, bytes(data), revision, kv_expires_ms(now_ms, ttl_ms))

    async def kv_delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            await conn.execute(f"DELETE FROM {s}.kv WHERE key = %s", (key,))
            await self._purge(conn, now_ms)

        await self.pool.transaction(body, "delete a key-value entry")

    async def kv_scan(self, now_ms: int, cursor: str, limit: int) -> tuple[list[KVEntry], str]:
        """A page in the code-point order of the keys (the cursor is the last key handed
        out), whatever the database's collation."""
        check_kv_scan(now_ms, limit)
        s = self.pool.schema

        async def body(conn: Conn) -> list[tuple[str, bytes, int, int | None]]:
            found = await conn.execute(
                f'SELECT key, data, revision, expires_ms FROM {s}.kv WHERE key COLLATE "C" > %s '
                'AND (expires_ms IS NULL OR expires_ms > %s) ORDER BY key COLLATE "C" LIMIT %s',
                (cursor, now_ms, limit + 1),
            )
            return list(await found.fetchall())

        rows = await self.pool.read(body, "scan the key-value entries")
        page = [KVEntry(k, bytes(d), int(r), x) for k, d, r, x in rows[:limit]]
        return page, page[-1].key if len(rows) > limit else ""
