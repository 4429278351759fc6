"""One backend's connection to NATS: connecting, the reply subscription, requests, closing.

The only owner of the nats-py ``Client`` of a :class:`~stepsource.adapters.nats.NatsBackend`;
every part of the backend reaches the server through it (and through
:class:`~stepsource.adapters.nats.jetstream.JetStream`, the JetStream API above it), as nats-py
composes ``JetStreamContext`` and ``KeyValue`` around one ``Client``.

Nothing connects at construction: the first call connects, runs the setup that
:meth:`NatsConnection.on_connect` registered (creating the streams), and reads the server's
``max_payload``. nats-py runs on asyncio only: under any other event loop every call raises
:class:`UsageError`. Every request and batched direct get of a connection gets its answer
through one subscription (:class:`~stepsource.adapters.nats.replies.Replies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from stepsource.adapters.nats.replies import Answer, Replies
from stepsource.adapters.nats.wire import JsError, NatsOptions, Transient
from stepsource.errors import (
    BackendUnavailableError,
    LimitExceededError,
    StepsourceError,
    UsageError,
)

__all__ = ["NatsConnection"]

T = TypeVar("T")
_logger = logging.getLogger("stepsource.nats")
_RESERVE = 16 * 1024  # of max_payload, for headers and framing
#: seconds a connect may take in all (nats-py's own attempts and TLS handshakes included)
_CONNECT_DEADLINE = 7.0


class _TlsRefused(Exception):
    """Raised out of nats-py's connect when a TLS handshake fails (see ``_connect``)."""


def _unreachable(errors: list[BaseException]) -> bool:
    """Whether the connect failed before any server answered (refused, timed out)."""
    return all(
        isinstance(e, (ConnectionRefusedError, TimeoutError, nats.errors.NoServersError))
        for e in errors
    )


async def _nothing(nc: Client) -> None:
    return None


class NatsConnection:
    """The connection of one backend object, made on first use in the running event loop.

    ``max_commit_bytes`` is the server's ``max_payload`` less room for headers once
    connected (the server default until then). One object serves one asyncio event loop
    at a time (a call from another loop reconnects there).
    """

    def __init__(
        self, options: NatsOptions, *, request_timeout: float, operation_timeout: float
    ) -> None:
        self.options = options
        self.request_timeout = request_timeout
        self.operation_timeout = operation_timeout
        self.max_commit_bytes = 1024 * 1024 - _RESERVE  # the server default, until connected
        self._setup: Callable[[Client], Awaitable[None]] = _nothing
        self._nc: Client | None = None
        self._closer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._replies: Replies | None = None  # the reply subscription of the connection
        #: whether the server stopped answering (logged once when it starts and once it ends)
        self.outage = False

    def on_connect(self, setup: Callable[[Client], Awaitable[None]]) -> None:
        """Run ``setup`` on every new connection before anything else uses it."""
        self._setup = setup

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The running asyncio loop; :class:`UsageError` under any other event loop."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError(
                "the NATS backend runs on asyncio only: its driver, nats-py, has no support "
                "for trio or other event loops",
                hint="Run stepsource under asyncio (anyio.run(..., backend='asyncio')), or "
                "use a sqlite:// or memory:// URL",
            ) from None

    def where(self) -> str:
        """The servers, for messages."""
        return ", ".join(self.options.servers)

    def unavailable(self, what: str, cause: object, hint: str | None = None) -> StepsourceError:
        return BackendUnavailableError(
            f"NATS at {self.where()} failed to {what} ({cause})",
            hint=hint
            or "Check that nats-server runs there with JetStream enabled (-js) and is reachable",
        )

    # -- connecting -------------------------------------------------------------------------
    async def client(self) -> Client:
        """The connection of the running loop, made (and set up) if there is none."""
        loop = self.running_loop()
        nc = self._nc
        if nc is not None and self._loop is loop and not nc.is_closed:
            return nc
        if self._loop is not loop:  # a connection of another (maybe finished) loop
            self._nc, self._loop = None, None
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            nc = await self._connect()
            try:
                await self._setup(nc)
            except BaseException:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise
            self.max_commit_bytes = max(nc.max_payload - _RESERVE, 1024)
            self._nc, self._loop = nc, loop
            old = self._closer  # the closer of a connection nats-py gave up on
            if old is not None and not old.done() and old.get_loop() is loop:
                old.cancel()
            self._closer = loop.create_task(self._close_when_cancelled(nc))
            return nc

    @staticmethod
    async def _close_when_cancelled(nc: Client) -> None:
        """Close the connection when this task is cancelled: by :meth:`aclose`, or by the
        event loop shutting down with the backend still open (nats-py's own tasks would
        otherwise leave the socket to the garbage collector)."""
        try:
            await asyncio.Event().wait()
        finally:
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _connect(self) -> Client:
        """A new connection, within :data:`_CONNECT_DEADLINE` seconds (or
        ``operation_timeout`` if shorter); every failure is a :class:`BackendUnavailableError`
        naming the servers and saying what to check."""
        errors: list[BaseException] = []
        connecting = True

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            _logger.debug("nats: %s", exc)
            if connecting and isinstance(exc, ssl.SSLError):
                # a refused certificate is refused again on every attempt, and nats-py's
                # cleanup after a failed handshake never returns: give up at once
                raise _TlsRefused from None

        async def quiet() -> None:
            return None

        options = self.options
        kwargs: dict[str, Any] = {}
        if options.user is not None:
            kwargs["user"] = options.user
            kwargs["password"] = options.password or ""
        if options.token is not None:
            kwargs["token"] = options.token
        if options.creds is not None:
            if importlib.util.find_spec("nkeys") is None:  # nats-py signs with it
                raise UsageError(
                    "the NATS URL's creds= option needs the nkeys package, which is not installed",
                    hint="pip install 'nats-py[nkeys]' (or give user:password@ or ?token=)",
                )
            kwargs["user_credentials"] = options.creds
        if options.tls_ca or options.tls_cert:
            try:
                context = ssl.create_default_context(cafile=options.tls_ca)
                if options.tls_cert and options.tls_key:
                    context.load_cert_chain(options.tls_cert, options.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"the TLS files of the NATS URL cannot be used ({exc})") from None
            kwargs["tls"] = context
        kwargs["reconnect_time_wait"] = 0.2  # typed int by nats-py, a float works
        deadline = min(_CONNECT_DEADLINE, self.operation_timeout)
        nc = Client()
        try:
            async with asyncio.timeout(deadline):
                await nc.connect(
                    servers=[f"nats://{server}" for server in options.servers],
                    name="stepsource",
                    connect_timeout=2,
                    max_reconnect_attempts=2,
                    error_cb=on_error,
                    disconnected_cb=quiet,
                    closed_cb=quiet,
                    **kwargs,
                )
            connecting = False
            return nc
        except (TimeoutError, _TlsRefused, nats.errors.Error, OSError) as exc:
            connecting = False
            await self._discard(nc)
            raise self._refusal(errors, exc, deadline, tls="tls" in kwargs) from None
        except BaseException:
            connecting = False
            await self._discard(nc)
            raise

    @staticmethod
    async def _discard(nc: Client) -> None:
        """Close a connection that never opened, without waiting long: after a failed TLS
        handshake nats-py's close waits for a stream that never closes."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                await nc.close()

    def _refusal(
        self, errors: list[BaseException], exc: BaseException, deadline: float, *, tls: bool
    ) -> StepsourceError:
        """The error of a failed connect: the server's own reason when it gave one (the
        credentials or the TLS certificates refused), else the last failure seen."""
        refusals = [
            e for e in errors if "authori" in str(e).lower() or "authenti" in str(e).lower()
        ]
        handshakes = [e for e in errors if isinstance(e, ssl.SSLError)]
        if isinstance(exc, TimeoutError) and not errors:
            exc = TimeoutError(f"no connection within {deadline:g} s")
        cause = (refusals or handshakes or errors or [exc])[-1]
        text = str(cause) or type(cause).__name__
        hint = None
        if refusals:  # the server said why (a reset of the socket may come after)
            hint = (
                "the server refused the credentials: give user:password@ in the URL, "
                "?token=..., or ?creds=/path/to/user.creds"
            )
        elif handshakes or (tls and not _unreachable(errors or [exc])):
            hint = (
                "check the certificates: tls_ca= must name the CA that signed the server's "
                "certificate, and if the server requires client certificates, tls_cert= and "
                "tls_key= must give one that its CA signed"
            )
        return self.unavailable("accept a connection", text, hint)

    async def close(self, meanwhile: Callable[[], Awaitable[None]]) -> None:
        """Close the connection; the next call reconnects. ``meanwhile`` runs once nothing
        new can use the connection and before its socket is closed (the parts stop what
        they have in flight on it)."""
        self.running_loop()
        nc, self._nc = self._nc, None
        loop, self._loop = self._loop, None
        closer, self._closer = self._closer, None
        self._replies = None
        await meanwhile()
        if nc is not None and loop is asyncio.get_running_loop() and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()
        if closer is not None and loop is asyncio.get_running_loop():
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer

    # -- requests ---------------------------------------------------------------------------
    async def guard(self, work: Awaitable[T], what: str) -> T:
        """Await ``work``; translate what escapes into the error tree."""
        try:
            self.running_loop()  # under trio: a clear UsageError, before anything runs
        except UsageError:
            if isinstance(work, Coroutine):
                work.close()
            raise
        try:
            return await work
        except StepsourceError:
            raise
        except (Transient, JsError, nats.errors.Error, OSError) as exc:
            raise self.unavailable(what, exc) from None

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        nc: Client | None = None,
        retry: bool = True,
    ) -> Msg:
        """One request/reply, retried with backoff on transient failures (if ``retry``).

        Once a try failed, a connection that cannot be made again (nats-py gave up
        reconnecting) is transient too, until ``operation_timeout``; the first try's
        connect failure is raised at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay, failed = 0.02, False
        while True:
            try:
                client = nc or await self.client()
            except BackendUnavailableError:
                if not retry or not failed or loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            size = len(payload)
            if headers:
                size += sum(map(len, headers)) + sum(map(len, headers.values())) + 4 * len(headers)
            if size + 16 > client.max_payload:
                raise LimitExceededError(
                    f"a message of {size} bytes is larger than the server's max_payload of "
                    f"{client.max_payload}",
                    hint="Store large payloads elsewhere, or raise max_payload on the server",
                )
            try:
                replies = await self.replies(client)
                reply = await replies.request(subject, payload, headers, self.request_timeout)
                if self.outage:  # one warning per outage, however many calls waited it out
                    self.outage = False
                    _logger.warning("the NATS server answers again: carrying on")
                return reply
            except nats.errors.MaxPayloadError:
                raise LimitExceededError(
                    f"a message of {len(payload)} bytes is larger than the server's max_payload",
                    hint="Store large payloads elsewhere, or raise max_payload on the server",
                ) from None
            except (
                TimeoutError,
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                if not self.outage:
                    self.outage = True
                    _logger.warning("the NATS server does not answer (%r); retrying", exc)
                if not retry or loop.time() + delay > deadline:
                    raise Transient(str(exc) or type(exc).__name__) from None
                failed = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str], answer: asyncio.Future[Any]
    ) -> None:
        """Publish a request and return once it is on its way; its reply settles ``answer``
        (or ``TimeoutError`` does, after ``request_timeout``). Raises what kept it from being
        sent: :class:`LimitExceededError`, :class:`Transient` or a failed connect."""
        nc = await self.client()
        size = len(payload) + sum(map(len, headers)) + sum(map(len, headers.values()))
        if size + 4 * len(headers) + 16 > nc.max_payload:
            raise LimitExceededError(
                f"a message of {size} bytes is larger than the server's max_payload of "
                f"{nc.max_payload}",
                hint="Store large payloads elsewhere, or raise max_payload on the server",
            )
        try:
            replies = await self.replies(nc)
            token = replies.token()
            timer = asyncio.get_running_loop().call_later(
                self.request_timeout, replies.expire, token
            )
            replies.waiting[token] = Answer(answer, timer)
            try:
                await nc.publish(
                    subject, payload, reply=f"{replies.prefix}.{token}", headers=headers
                )
            except BaseException:
                replies.waiting.pop(token, None)
                timer.cancel()
                raise
        except nats.errors.MaxPayloadError:
            raise LimitExceededError(
                f"a message of {len(payload)} bytes is larger than the server's max_payload",
                hint="Store large payloads elsewhere, or raise max_payload on the server",
            ) from None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None

    async def replies(self, nc: Client) -> Replies:
        """The connection's :class:`Replies`, subscribed on first use."""
        replies = self._replies
        if replies is not None and replies.nc is nc:
            return replies
        replies = self._replies = Replies(nc)
        try:
            await replies.subscribe()
        except BaseException:
            if self._replies is replies:
                self._replies = None
            raise
        return replies
