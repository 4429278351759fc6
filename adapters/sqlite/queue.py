"""The SQLite backend's work queue: the ``queue`` table, one row per queued execution.

A lease is one ``UPDATE`` inside the writer's ``BEGIN IMMEDIATE`` transaction, so no two
processes lease one row at once. A commit changes its row in its own transaction instead
(:mod:`~stepsource.adapters.sqlite.commits`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from stepsource.adapters.ports import Lease
from stepsource.adapters.sqlite.connection import SQLiteConnection

__all__ = ["SQLiteQueue"]


class SQLiteQueue:
    """Leases, renewals, releases and the next due time of the work queue."""

    def __init__(self, connection: SQLiteConnection) -> None:
        self.connection = connection

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        steps = list(dict.fromkeys(step_ids))
        if not steps or limit <= 0:
            return []
        expires = now_ms + lease_ms

        def body(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                "SELECT stream_id, step_id, priority FROM queue "
                f"WHERE step_id IN ({', '.join('?' * len(steps))}) AND due_ms <= ? "
                "AND (lease_owner IS NULL OR lease_expires_ms < ?) "
                "ORDER BY priority DESC, due_ms ASC, stream_id ASC LIMIT ?",
                (*steps, now_ms, now_ms, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE queue SET lease_owner = ?, lease_expires_ms = ? WHERE stream_id = ?",
                [(worker_id, expires, stream_id) for stream_id, _, _ in rows],
            )
            return [Lease(stream_id, step, priority, expires) for stream_id, step, priority in rows]

        return await self.connection.write(body)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        wanted = list(dict.fromkeys(stream_ids))
        if not wanted:
            return []

        def body(conn: sqlite3.Connection) -> list[str]:
            return [
                stream_id
                for stream_id in wanted
                if conn.execute(
                    "UPDATE queue SET lease_expires_ms = ? WHERE stream_id = ? AND lease_owner = ?",
                    (now_ms + lease_ms, stream_id, worker_id),
                ).rowcount
            ]

        return await self.connection.write(body)

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self.connection.write(
            lambda conn: conn.execute(
                "UPDATE queue SET lease_owner = NULL, lease_expires_ms = 0, "
                "due_ms = COALESCE(?, due_ms) WHERE stream_id = ? AND lease_owner = ?",
                (due_ms, stream_id, worker_id),
            )
        )

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return 0

        def query(conn: sqlite3.Connection) -> int:
            (count,) = conn.execute(  # runnable: the rule of _rules.wake_ms, row by row
                "SELECT COUNT(*) FROM queue WHERE (CASE WHEN lease_owner IS NULL THEN due_ms "
                "ELSE MAX(due_ms, lease_expires_ms + 1) END) <= ? "
                f"AND step_id IN ({', '.join('?' * len(steps))})",
                [now_ms, *steps],
            ).fetchone()
            return int(count)

        return await self.connection.read(query)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return None

        def query(conn: sqlite3.Connection) -> int | None:
            (due,) = conn.execute(  # the rule of _rules.wake_ms, row by row
                "SELECT MIN(CASE WHEN lease_owner IS NULL THEN due_ms "
                "ELSE MAX(due_ms, lease_expires_ms + 1) END) FROM queue "
                f"WHERE step_id IN ({', '.join('?' * len(steps))})",
                steps,
            ).fetchone()
            return None if due is None else int(due)

        return await self.connection.read(query)
