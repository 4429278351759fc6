"""The Redis backend's work queue and leases.

Each queued execution has a row (hash ``P:q:{S}``: step, priority, due, and the owner and
expiry of its lease) and a member in its step's sorted set ``P:due:<step>``, scored by when
it may be leased: its due time, and for a leased row not before its lease expires
(:func:`~stepsource.adapters._rules.wake_ms`). A lease is one script run: it takes the
members scored up to ``now``, orders them by priority, due time and id (as the memory
reference does), and leases the first ones, so two workers never lease one execution.
``next_due_ms`` reads the lowest score of each step.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepsource.adapters.ports import Lease
from stepsource.adapters.redis.connection import RedisConnection
from stepsource.adapters.redis.scripts import LEASE, RELEASE, RENEW

__all__ = ["RedisQueue"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue:
    """Lease, renew and release executions; the earliest due time of some steps."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.keys = conn.keys

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        steps = list(dict.fromkeys(step_ids))
        if limit <= 0 or not steps:
            return []
        expires = now_ms + lease_ms
        flat = await self.conn.run(
            LEASE, [worker_id, now_ms, expires, limit, *steps], "lease executions"
        )
        return [
            Lease(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2]), expires)
            for i in range(0, len(flat), 3)
        ]

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        streams = list(dict.fromkeys(stream_ids))
        if not streams:
            return []
        held = await self.conn.run(RENEW, [worker_id, now_ms + lease_ms, *streams], "renew leases")
        return [_text(stream) for stream in held]

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        args = [worker_id, stream_id, "0" if due_ms is None else "1", due_ms or 0]
        await self.conn.run(RELEASE, args, "release a lease")

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return None
        client = await self.conn.client()
        async with self.conn.guard("read the work queue"):
            pipe = client.pipeline(transaction=False)
            for step in steps:
                pipe.zrange(self.keys.due(step), 0, 0, withscores=True)
            answers = await pipe.execute()
        dues = [int(pairs[0][1]) for pairs in answers if pairs]
        return min(dues, default=None)
