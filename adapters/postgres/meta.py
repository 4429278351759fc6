"""Published step definitions and snapshots of the PostgreSQL backend (both rebuildable)."""

from __future__ import annotations

from stepsource.adapters.ports import Snapshot
from stepsource.adapters.postgres.pool import Conn, Pool

__all__ = ["MetaStore"]

_NO_LIMIT = 2**63 - 1


class MetaStore:
    """The ``definitions`` and ``snapshots`` tables."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO {s}.definitions (step_id, version, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (step_id) DO UPDATE SET version = excluded.version, "
                "data = excluded.data",
                (step_id, version, bytes(data)),
            )

        await self.pool.transaction(body, "publish a step definition")

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        s = self.pool.schema

        async def body(conn: Conn) -> tuple[str, bytes] | None:
            cursor = await conn.execute(
                f"SELECT version, data FROM {s}.definitions WHERE step_id = %s", (step_id,)
            )
            row = await cursor.fetchone()
            return None if row is None else (str(row[0]), bytes(row[1]))

        return await self.pool.read(body, "read a step definition")

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO {s}.snapshots (stream_id, version, topic, data) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (stream_id) DO UPDATE SET "
                "version = excluded.version, topic = excluded.topic, data = excluded.data "
                f"WHERE excluded.version >= {s}.snapshots.version",
                (snapshot.stream_id, snapshot.version, snapshot.topic, bytes(snapshot.data)),
            )

        await self.pool.transaction(body, "save a snapshot")

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        s = self.pool.schema
        upto = _NO_LIMIT if max_version is None else max(min(max_version, _NO_LIMIT), -_NO_LIMIT)

        async def body(conn: Conn) -> Snapshot | None:
            cursor = await conn.execute(
                f"SELECT stream_id, version, topic, data FROM {s}.snapshots "
                "WHERE stream_id = %s AND version <= %s",
                (stream_id, upto),
            )
            row = await cursor.fetchone()
            return None if row is None else Snapshot(row[0], int(row[1]), row[2], bytes(row[3]))

        return await self.pool.read(body, "read a snapshot")
