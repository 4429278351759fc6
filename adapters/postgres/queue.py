"""The work queue (leases) and the inbox of the PostgreSQL backend.

:meth:`WorkQueue.lease` picks the runnable rows with ``FOR UPDATE SKIP LOCKED`` and leases
them in the same statement, so two workers (of any processes) never lease one stream, and a
row an append is checking (locked ``FOR UPDATE`` by it) is skipped until that commit is done.
:meth:`WorkQueue.post` inserts an inbox item and wakes the stream's queue row in one
transaction. The time rules are those of :mod:`stepsource.adapters._rules`, written in SQL.

A lease call runs its statement to the end even when its caller is cancelled (a worker
shutting down), as every call of the pool does for a grace (:mod:`.statement_grace`), and
gives back what it leased before the cancellation goes on: the server would run the
statement anyway (it received it; psycopg's cancel request may come too late, and under
anyio psycopg gives the request up and closes the connection), and the executions it leased
would stay leased to a worker that is gone until the lease lapses, even the one the same
worker released meanwhile. Only a server that leaves the statement unanswered past the
grace gets it interrupted: then a shutdown goes on, and what the server may still lease
stays leased until its lease lapses.

Each method is one statement (data-modifying ``WITH`` clauses where it writes two tables),
sent on an autocommit connection where it is its own transaction: one round trip, with no
BEGIN and COMMIT of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel

from stepsource.adapters._rules import check_post
from stepsource.adapters.ports import InboxItem, Lease
from stepsource.adapters.postgres.pool import Conn, Pool
from stepsource.adapters.postgres.wakeups import CHANNEL, NOTIFY

__all__ = ["WorkQueue"]

_NO_LIMIT = 2**63 - 1


class WorkQueue:
    """The ``queue`` and ``inbox`` tables."""

    def __init__(self, pool: Pool, max_commit_bytes: int) -> None:
        self.pool = pool
        self.max_commit_bytes = max_commit_bytes

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        steps = list(dict.fromkeys(step_ids))
        if not steps or limit <= 0:
            return []
        s = self.pool.schema
        expires = now_ms + lease_ms

        async def body(conn: Conn) -> list[Lease]:
            cursor = await conn.kept_cursor().execute(
                f"UPDATE {s}.queue AS q SET lease_owner = %s, lease_expires_ms = %s "
                f"FROM (SELECT stream_id FROM {s}.queue WHERE step_id = ANY(%s) "
                "AND due_ms <= %s AND (lease_owner IS NULL OR lease_expires_ms < %s) "
                "ORDER BY priority DESC, due_ms ASC, stream_id ASC LIMIT %s "
                "FOR UPDATE SKIP LOCKED) AS picked WHERE q.stream_id = picked.stream_id "
                "RETURNING q.stream_id, q.step_id, q.priority, q.due_ms",
                (worker_id, expires, steps, now_ms, now_ms, min(limit, _NO_LIMIT)),
            )
            rows = sorted(await cursor.fetchall(), key=lambda r: (-r[2], r[3], r[0]))
            return [Lease(row[0], row[1], int(row[2]), expires) for row in rows]

        # ended even if the caller is cancelled meanwhile (the pool's grace, see above)
        leases = await self.pool.statement(body, "lease executions")
        if leases:
            try:
                await anyio.lowlevel.checkpoint_if_cancelled()
            except BaseException:  # the caller will not run them: give them back first
                await self._give_back(worker_id, [lease.stream_id for lease in leases])
                raise
        return leases

    async def _give_back(self, worker_id: str, stream_ids: list[str]) -> None:
        """Release leases just taken (as :meth:`release` does) in one statement."""
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            await conn.kept_cursor().execute(
                f"WITH released AS (UPDATE {s}.queue SET lease_owner = NULL, "
                "lease_expires_ms = 0 WHERE stream_id = ANY(%s) AND lease_owner = %s) "
                f"{NOTIFY}",
                (stream_ids, worker_id, s),
            )

        await self.pool.statement(body, "give back leases")

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        wanted = list(dict.fromkeys(stream_ids))
        if not wanted:
            return []
        s = self.pool.schema

        async def body(conn: Conn) -> list[str]:
            # rows locked in stream order, as appends lock them
            cursor = await conn.kept_cursor().execute(
                f"UPDATE {s}.queue AS q SET lease_expires_ms = %s FROM (SELECT stream_id "
                f"FROM {s}.queue WHERE stream_id = ANY(%s) AND lease_owner = %s "
                "ORDER BY stream_id FOR UPDATE) AS held WHERE q.stream_id = held.stream_id "
                "AND q.lease_owner = %s RETURNING q.stream_id",
                (now_ms + lease_ms, wanted, worker_id, worker_id),
            )
            held = {row[0] for row in await cursor.fetchall()}
            return [stream_id for stream_id in wanted if stream_id in held]

        return await self.pool.statement(body, "renew leases")

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            await conn.kept_cursor().execute(  # another worker may take it: wake the listeners
                f"WITH released AS (UPDATE {s}.queue SET lease_owner = NULL, "
                "lease_expires_ms = 0, due_ms = COALESCE(%s::bigint, due_ms) "
                f"WHERE stream_id = %s AND lease_owner = %s) {NOTIFY}",
                (due_ms, stream_id, worker_id, s),
            )

        await self.pool.statement(body, "release a lease")

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return 0
        s = self.pool.schema

        async def body(conn: Conn) -> int:
            # runnable: the rule of _rules.wake_ms, row by row
            cursor = await conn.kept_cursor().execute(
                f"SELECT count(*) FROM {s}.queue WHERE (CASE WHEN lease_owner IS NULL "
                "THEN due_ms ELSE GREATEST(due_ms, lease_expires_ms + 1) END) <= %s "
                "AND step_id = ANY(%s)",
                (now_ms, steps),
            )
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        return await self.pool.read(body, "count the runnable executions")

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        steps = list(dict.fromkeys(step_ids))
        if not steps:
            return None
        s = self.pool.schema

        async def body(conn: Conn) -> int | None:
            cursor = await conn.kept_cursor().execute(  # the rule of _rules.wake_ms, row by row
                "SELECT MIN(CASE WHEN lease_owner IS NULL THEN due_ms "
                f"ELSE GREATEST(due_ms, lease_expires_ms + 1) END) FROM {s}.queue "
                "WHERE step_id = ANY(%s)",
                (steps,),
            )
            row = await cursor.fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self.pool.read(body, "read the next due time")

    # -- the inbox --------------------------------------------------------------------------
    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        s = self.pool.schema

        async def body(conn: Conn) -> int:
            # the item, and every queue row of the stream written (so locked until this
            # commits) with a later due time made now: a suspension committed at the same
            # moment either waits for this post and then sees its item, or commits first and
            # this makes its row due; then the listeners are woken
            cursor = await conn.kept_cursor().execute(
                f"WITH item AS (INSERT INTO {s}.inbox (stream_id, kind, name, data, posted_ms) "
                "VALUES (%(stream)s, %(kind)s, %(name)s, %(data)s, %(now)s) RETURNING id), "
                f"woken AS (UPDATE {s}.queue SET due_ms = LEAST(due_ms, %(now)s) "
                "WHERE stream_id = %(stream)s) "
                f"SELECT item.id, pg_notify('{CHANNEL}', %(schema)s) FROM item",
                {
                    "stream": stream_id,
                    "kind": kind,
                    "name": name,
                    "data": bytes(data),
                    "now": now_ms,
                    "schema": s,
                },
            )
            row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        return await self.pool.statement(body, "post to an inbox")

    async def reserve_inbox_ids(self, above: int) -> None:
        """Ids after ``above``: the inbox's identity sequence moved on to it (never back)."""
        s = self.pool.schema

        async def body(conn: Conn) -> None:
            cursor = conn.kept_cursor()
            await cursor.execute(f"SELECT pg_get_serial_sequence('{s}.inbox', 'id')")
            row = await cursor.fetchone()
            assert row is not None
            sequence = str(row[0])
            await cursor.execute(f"SELECT last_value, is_called FROM {sequence}")
            last = await cursor.fetchone()
            assert last is not None
            used = int(last[0]) if last[1] else int(last[0]) - 1
            if used < above:
                await cursor.execute("SELECT setval(%s, %s)", (sequence, above))

        await self.pool.statement(body, "reserve inbox ids")

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        s = self.pool.schema

        async def body(conn: Conn) -> list[InboxItem]:
            cursor = await conn.execute(  # a fresh cursor: the rows are not kept
                f"SELECT id, stream_id, kind, name, data, posted_ms FROM {s}.inbox "
                "WHERE stream_id = %s AND id > %s ORDER BY id LIMIT %s",
                (stream_id, max(min(after_id, _NO_LIMIT), -_NO_LIMIT), min(limit, _NO_LIMIT)),
            )
            return [InboxItem(*row) for row in await cursor.fetchall()]

        return await self.pool.read(body, "read an inbox")
