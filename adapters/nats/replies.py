"""How the NATS backend talks to the server below nats-py's conveniences.

One reply subscription per connection answers every request and batched direct get
(:class:`Replies`). Used by :mod:`.connection` and :mod:`.jetstream` only.
"""

from __future__ import annotations

import asyncio
from email.parser import BytesHeaderParser
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from stepsource.adapters.nats.wire import Stored, Transient

__all__ = ["Answer", "Batch", "Replies", "parse_headers"]

_HEADER_PARSER = BytesHeaderParser()


def parse_headers(raw: bytes) -> dict[str, str]:
    """Headers of a ``NATS/1.0`` header block (as STREAM.MSG.GET returns them)."""
    _, _, rest = raw.partition(b"\r\n")
    return {key: str(value) for key, value in _HEADER_PARSER.parsebytes(rest).items()}


class Batch:
    """The reply of one batched direct get, collected message by message (see
    :class:`Replies`): ``done`` ends with ``(messages, whether more match)``."""

    __slots__ = ("done", "found", "seen")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.found: list[Stored] = []
        self.done: asyncio.Future[tuple[list[Stored], bool]] = loop.create_future()
        self.seen = 0  # messages received so far

    def take(self, msg: Msg) -> None:
        if self.done.done():
            return
        self.seen += 1
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            try:
                stored = Stored(
                    int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data
                )
            except (KeyError, ValueError) as exc:
                self.done.set_exception(Transient(f"a direct get answered without {exc}"))
                return
            self.found.append(stored)
        elif status == "404":
            self.done.set_result((self.found, False))
        elif status == "204":
            self.done.set_result((self.found, int(headers.get("Nats-Num-Pending", "0")) > 0))
        else:
            description = headers.get("Description")
            self.done.set_exception(Transient(f"direct get answered {status} {description}"))


class Answer:
    """The answer to come of a request sent by
    :meth:`~stepsource.adapters.nats.connection.NatsConnection.send`, and the timer that
    gives up on it."""

    __slots__ = ("future", "timer")

    def __init__(self, future: asyncio.Future[Any], timer: asyncio.TimerHandle) -> None:
        self.future = future
        self.timer = timer


class Replies:
    """The replies to this backend's requests on one connection: one wildcard subscription,
    each request's answer told apart by the last token of its reply subject. A request
    waits for one message, a batched direct get collects several (:class:`Batch`).

    nats-py's own ``request`` does the same for one message, at about a quarter more
    Python time per request (a token from the random source, a done callback, a
    ``wait_for``); a batch on a subscription of its own would cost a SUB, an UNSUB and a
    task per message read."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[Msg] | Batch | Answer] = {}
        self._count = 0

    async def subscribe(self) -> None:
        # The SUB is queued on the connection before this first awaits, so no request made
        # through this object afterwards can overtake it. The replies are no larger than
        # the requests asked for: the limit on what may wait unread only stops a runaway.
        await self.nc.subscribe(f"{self.prefix}.*", cb=self._deliver, pending_bytes_limit=1 << 30)

    def token(self) -> str:
        self._count += 1
        return str(self._count)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """Publish with a reply subject of this object and wait up to ``timeout`` seconds
        for the answer: ``TimeoutError`` if none comes, ``NoRespondersError`` if the server
        says nobody listens (as nats-py's ``request`` raises)."""
        token = self.token()
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiting[token] = answer
        try:
            await self.nc.publish(subject, payload, reply=f"{self.prefix}.{token}", headers=headers)
            async with asyncio.timeout(timeout):
                msg = await answer
        finally:
            self.waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

    def expire(self, token: str) -> None:
        """No answer came in time to a request of
        :meth:`~stepsource.adapters.nats.connection.NatsConnection.send`."""
        waiter = self.waiting.pop(token, None)
        if isinstance(waiter, Answer) and not waiter.future.done():
            waiter.future.set_exception(TimeoutError())

    async def _deliver(self, msg: Msg) -> None:
        token = msg.subject[len(self.prefix) + 1 :]
        waiter = self.waiting.get(token)
        if isinstance(waiter, Batch):
            waiter.take(msg)
        elif isinstance(waiter, Answer):
            del self.waiting[token]
            waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_result(msg)
        elif waiter is not None and not waiter.done():
            waiter.set_result(msg)
