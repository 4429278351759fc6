"""The Redis backend's published step definitions (``P:def:<step>``) and snapshots
(``P:snap:{S}``), one hash each: derived data, rebuildable."""

from __future__ import annotations

from stepsource.adapters.ports import Snapshot
from stepsource.adapters.redis.connection import Arg, RedisConnection
from stepsource.adapters.redis.scripts import SAVE_SNAPSHOT

__all__ = ["RedisMeta"]


class RedisMeta:
    """Step definitions and snapshots."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.keys = conn.keys

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        client = await self.conn.client()
        async with self.conn.guard("publish a step definition"):
            # one HSET of both fields: the version and data are replaced together
            await client.hset(
                self.keys.definition(step_id), mapping={"v": version, "d": bytes(data)}
            )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        version, data = await self.conn.hmget(
            self.keys.definition(step_id), ["v", "d"], "read a step definition"
        )
        if version is None:
            return None
        return version.decode(), data or b""

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        args: list[Arg] = [
            snapshot.stream_id,
            snapshot.version,
            snapshot.topic,
            bytes(snapshot.data),
        ]
        await self.conn.run(SAVE_SNAPSHOT, args, "save a snapshot")

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        version, topic, data = await self.conn.hmget(
            self.keys.snapshot(stream_id), ["v", "t", "d"], "read a snapshot"
        )
        if version is None:
            return None
        snapshot = Snapshot(stream_id, int(version), (topic or b"").decode(), data or b"")
        if max_version is not None and snapshot.version > max_version:
            return None
        return snapshot
