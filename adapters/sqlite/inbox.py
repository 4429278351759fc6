"""The SQLite backend's inboxes: the ``inbox`` table, items for executions to take in.

:meth:`SQLiteInbox.post` inserts an item and wakes the stream's queue row in one transaction
of its own; the commit that moves items into the stream deletes them
(:mod:`~stepsource.adapters.sqlite.commits`).
"""

from __future__ import annotations

import sqlite3

from stepsource.adapters._rules import check_post
from stepsource.adapters.ports import InboxItem
from stepsource.adapters.sqlite.commits import post_in
from stepsource.adapters.sqlite.connection import SQLiteConnection
from stepsource.adapters.sqlite.schema import NO_LIMIT

__all__ = ["SQLiteInbox"]


class SQLiteInbox:
    """Posts to and reads of the executions' inboxes."""

    def __init__(self, connection: SQLiteConnection) -> None:
        self.connection = connection

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.connection.max_commit_bytes)
        return await self.connection.write(
            lambda conn: post_in(conn, stream_id, kind, name, data, now_ms)
        )

    async def reserve_ids(self, above: int) -> None:
        """Ids after ``above``: the ``inbox`` table's AUTOINCREMENT counter raised to it."""

        def body(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('inbox', ?)", (above,)
                )
            elif row[0] < above:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'inbox'", (above,))

        await self.connection.write(body)

    async def read(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        rows = await self.connection.read(
            lambda conn: conn.execute(
                "SELECT id, stream_id, kind, name, data, posted_ms FROM inbox "
                "WHERE stream_id = ? AND id > ? ORDER BY id LIMIT ?",
                (stream_id, after_id, min(limit, NO_LIMIT)),
            ).fetchall()
        )
        return [InboxItem(*row) for row in rows]
