"""Wake-ups between processes over PostgreSQL's ``LISTEN/NOTIFY``.

Transactions that may make an execution runnable (a commit that queues or suspends one or
posts to an inbox, an inbox post, a released lease) also run
``pg_notify('stepsource_wake', <schema>)``; those that only change an execution for its
observers (a start leased by its own worker, an end) run it with ``<schema>:change``, which
would only send every worker to lease nothing. PostgreSQL delivers a notice when, and only
if, the transaction commits. :meth:`Wakeups.watch` keeps one dedicated connection (outside
the pool) listening on that channel and calls ``work()`` for every notice of new work of its
own schema and ``change()`` for every other. After every (re)connect it calls ``work()``
once, since notices sent while it was not listening are lost; polling stays the fallback
(and the only path where a pooler in transaction mode cannot carry ``LISTEN``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import psycopg

from stepsource.adapters.postgres.pool import Conn, Pool
from stepsource.adapters.postgres.schema import CHANNEL
from stepsource.errors import StepsourceError

__all__ = ["CHANNEL", "NOTIFY", "Wakeups"]

#: the statement a transaction runs to wake the listeners of its schema (one parameter)
NOTIFY = f"SELECT pg_notify('{CHANNEL}', %s)"

_logger = logging.getLogger("stepsource.postgres")


class Wakeups:
    """The listening side: one connection per :meth:`watch` call."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def watch(self, work: Callable[[], None], change: Callable[[], None]) -> None:
        self.pool.running_loop()  # under trio: a clear UsageError
        delay = 0.1
        while True:
            try:
                await self._listen(work, change)
            except StepsourceError as exc:
                _logger.warning("not listening for wake-ups (polling meanwhile): %s", exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen(self, work: Callable[[], None], change: Callable[[], None]) -> None:
        schema = self.pool.schema
        changed = f"{schema}:change"
        conn: Conn | None = None
        try:
            conn = await self.pool.connect()
            await conn.execute(f"LISTEN {CHANNEL}")
            work()  # whatever was sent before we listened
            async for note in conn.notifies():
                if note.payload == schema:
                    work()
                elif note.payload == changed:
                    change()
        except psycopg.Error as exc:
            raise self.pool.translate(exc, "listen for wake-ups") from exc
        finally:
            if conn is not None:
                conn.pgconn.finish()
