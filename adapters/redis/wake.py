"""Wake-ups from the server: the Redis backend's :meth:`~stepsource.adapters.ports.Backend.watch`.

Every commit that changes its execution's queue row or posts an outbox, every post and
every release publishes one short message on the channel ``P:wake`` (inside its script, so
only after it is stored): ``w:<execution>`` when it may have made work runnable (a queue
update that enqueues or suspends, an outbox, an inbox item, a released lease),
``c:<execution>`` otherwise (leased in the commit, finished). A commit in the middle of an
execution (state, sub-step results) announces nothing: publishing and handling a message
per commit cost more than half the speed of sequential commits, and an observer of a
running execution re-reads it by polling anyway. An engine inside ``async with``
subscribes with one extra connection and turns them into its in-process notifications:
its workers lease at once instead of at their next poll, and handles and read models
re-read at once. Pub/sub is best effort (a message published while a subscriber
reconnects is lost), which is why the engine still polls: after a reconnect the watcher
wakes everything once, and a lost message costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio
import redis.exceptions
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stepsource.adapters.redis.connection import RedisConnection, to_text
from stepsource.errors import StepsourceError, UsageError

__all__ = ["RedisWakeups"]

_logger = logging.getLogger("stepsource.redis")
_READ_TIMEOUT = 5.0  # seconds a read waits before it checks in (below the socket timeout)
_BACKOFF = (0.1, 5.0)  # first and longest wait before subscribing again


class RedisWakeups:
    """Subscribes to ``P:wake`` and calls the engine back."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.channel = conn.keys.wake

    async def watch(
        self,
        on_work: Callable[[], None],
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        delay = _BACKOFF[0]
        while True:
            try:
                client = await self.conn.client()
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    async with asyncio.timeout(self.conn.socket_timeout):  # (see guard)
                        await pubsub.subscribe(self.channel)
                    if started:  # messages may have been lost meanwhile
                        on_work()
                    else:
                        started = True
                        task_status.started()
                    delay = _BACKOFF[0]
                    while True:
                        message = await pubsub.get_message(timeout=_READ_TIMEOUT)
                        if message is not None and message.get("type") == "message":
                            self._deliver(to_text(message["data"]), on_work, on_change)
            except UsageError:
                raise  # under trio: the clear refusal
            except (StepsourceError, redis.exceptions.RedisError, OSError) as exc:
                _logger.debug("wake-ups from Redis paused (%s); polling meanwhile", exc)
                if not started:  # the engine runs on polling until the server is back
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                delay = min(delay * 2, _BACKOFF[1])

    @staticmethod
    def _deliver(text: str, on_work: Callable[[], None], on_change: Callable[[str], None]) -> None:
        kind, _, execution_id = text.partition(":")
        if kind == "w":
            on_work()
        if execution_id:
            on_change(execution_id)
