"""The SQLite backend's published step definitions and snapshots (two tables, both derived
and rebuildable: the ``definitions`` workers publish, the ``snapshots`` the engine saves)."""

from __future__ import annotations

from stepsource.adapters.ports import Snapshot
from stepsource.adapters.sqlite.connection import SQLiteConnection
from stepsource.adapters.sqlite.schema import NO_LIMIT

__all__ = ["SQLiteMeta"]


class SQLiteMeta:
    """Step definitions by step id, and each execution's newest snapshot."""

    def __init__(self, connection: SQLiteConnection) -> None:
        self.connection = connection

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        await self.connection.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO definitions (step_id, version, data) VALUES (?, ?, ?)",
                (step_id, version, bytes(data)),
            )
        )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        row = await self.connection.read(
            lambda conn: conn.execute(
                "SELECT version, data FROM definitions WHERE step_id = ?", (step_id,)
            ).fetchone()
        )
        return None if row is None else (str(row[0]), bytes(row[1]))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self.connection.write(
            lambda conn: conn.execute(
                "INSERT INTO snapshots (stream_id, version, topic, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
                "topic = excluded.topic, data = excluded.data "
                "WHERE excluded.version >= snapshots.version",
                (snapshot.stream_id, snapshot.version, snapshot.topic, snapshot.data),
            )
        )

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        upto = NO_LIMIT if max_version is None else max_version
        row = await self.connection.read(
            lambda conn: conn.execute(
                "SELECT stream_id, version, topic, data FROM snapshots "
                "WHERE stream_id = ? AND version <= ?",
                (stream_id, upto),
            ).fetchone()
        )
        return None if row is None else Snapshot(*row)
