"""The distributed backend: NATS JetStream, for workers on many machines.

The only module that imports the ``nats-py`` driver (the ``nats`` extra): it connects,
creates the streams and carries requests. The event log is :mod:`~stepsource.adapters.nats_log`,
the queue, inbox, definitions, snapshots and key-value store
:mod:`~stepsource.adapters.nats_stores` (mixins of :class:`NatsBackend` that reach JetStream
only through its transport methods), bytes on the wire and the URL
:mod:`~stepsource.adapters.nats_wire`. nats-py runs on asyncio only:
under any other event loop every call raises :class:`UsageError`.

**Layout.** For the tenant ``stream=NAME`` (default ``STEPSOURCE``):

- stream ``NAME``, subjects ``NAME.ev.<execution>``: the event log, one message per commit
  (all its events, headers naming the first and last version); no deletes, no purges;
- stream ``NAME_inbox``, subjects ``NAME.in.<execution>``: inbox items, the message sequence
  is the item id;
- KV bucket ``NAME_queue``: one key per queued execution (step, priority, due, lease);
- KV bucket ``NAME_meta``: published definitions (``def.<step>``) and snapshots
  (``snap.<execution>``);
- KV bucket ``NAME_kv``: global-scope state, each key's expiry in a header.

**Appends** are guarded by ``Nats-Expected-Last-Subject-Sequence``: the sequence of the
message that holds ``expected_version`` comes from a per-execution cache of this object's
own appends and reads, else from the subject's last message. Codes 10071/10164 are a
version conflict; 10163 and lost connections are retried with backoff. Each publish carries
a unique ``Nats-Msg-Id``; when an acknowledgement was lost and the retry is refused, the
message after the expected one is read back: if it carries that id, the commit was stored.
Concurrent appends are pipelined: each caller publishes at once and awaits only its own
ack, so commits of many actors share the connection's write buffer and round trips. Every
request and batched direct get of a connection gets its answer through one subscription
(:class:`~stepsource.adapters.nats_replies.Replies`).

**Positions** are ``stream sequence * 1024 + index of the event in its message``: a commit
holds at most 1024 events; positions grow in commit order, with gaps between commits.

**Work queue.** Rows are changed by compare-and-set on the key's revision, so a lease is
atomic across processes. Each object mirrors the queue bucket in memory and catches up
(one batched direct get of what changed) before it leases, answers ``next_due_ms`` or
checks a commit's lease; its own writes enter the mirror at once.

**Not atomic with a commit** (JetStream has no multi-subject transaction), each safe:

- the lease check of ``Commit.lease_owner`` is made just before publishing, on the queue
  mirror caught up by a probe sent after the commit began (shared by concurrent commits,
  whose messages the probing task then sends; a row read if the probe fails): a zombie
  that passes it still fails the append, because the new holder's first append
  (StepLeased) moved the subject's last sequence;
- consumed inbox items are deleted after the commit is stored: a crash in between leaves
  items the engine already moved into the stream, and it skips those by id;
- a commit's outbox (inbox items for other executions, such as a child's nudge to its
  parent) is posted right after the commit is stored: a crash in between leaves the parent
  to the engine's periodic recheck of what it waits for;
- the queue update is written after the commit is stored (the events are the truth; a lost
  update leaves the row leased until its lease expires, then the execution is leased again
  and resumes by replay). ``suspend`` and :meth:`NatsBackend.post` both write the row by
  compare-and-set, the post *after* storing its item and even when nothing changes, so a
  post racing a suspend is always seen by one of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from stepsource.adapters.nats_log import NatsLog, Tail
from stepsource.adapters.nats_replies import Answer, Batch, FastClient, Replies, parse_headers
from stepsource.adapters.nats_wire import (
    JsError,
    NatsOptions,
    QueueRow,
    Stored,
    Transient,
    parse_nats_url,
)
from stepsource.adapters.ports import Backend
from stepsource.errors import (
    BackendUnavailableError,
    LimitExceededError,
    StepsourceError,
    UsageError,
)

__all__ = ["NatsBackend"]

T = TypeVar("T")
_logger = logging.getLogger("stepsource.nats")
_RESERVE = 16 * 1024  # of max_payload, for headers and framing
_RETRY_CODES = (10163, 10008, 10009)  # try again; cluster not ready; not the leader
_NS = 1_000_000_000
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


class NatsBackend(NatsLog, Backend):
    """Event streams, inboxes, work queue, definitions and snapshots on NATS JetStream.

    Nothing connects at construction: the first call (or :meth:`open`) connects, creates
    or validates the streams and buckets, and reads the server's ``max_payload``.
    :meth:`aclose` closes the connection; the next call reconnects. One object serves
    one asyncio event loop at a time (a call from another loop reconnects there).
    """

    def __init__(
        self,
        options: NatsOptions,
        *,
        request_timeout: float = 2.0,
        operation_timeout: float = 30.0,
    ) -> None:
        self.options = options
        self.request_timeout = request_timeout
        self.operation_timeout = operation_timeout
        self.max_commit_bytes = 1024 * 1024 - _RESERVE  # the server default, until connected
        name = options.stream
        self._events = name
        self._inbox = f"{name}_inbox"
        self._queue_bucket = f"{name}_queue"
        self._meta_bucket = f"{name}_meta"
        self._kv_bucket = f"{name}_kv"
        self._nc: Client | None = None
        self._closer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._replicas = 1
        self._tails: OrderedDict[str, Tail] = OrderedDict()
        self._rows: dict[str, tuple[int, QueueRow | None]] = {}  # the queue mirror
        self._rows_seen = 0  # the queue bucket's stream sequence the mirror has read up to
        self._checks = None  # lease checks waiting for the queue mirror to catch up
        self._replies: Replies | None = None  # the reply subscription of the connection
        #: whether the server stopped answering (logged once when it starts and once it ends)
        self.outage = False

    @classmethod
    def from_url(cls, url: str) -> NatsBackend:
        return cls(parse_nats_url(url))

    def __repr__(self) -> str:
        return f"NatsBackend(servers={list(self.options.servers)}, stream={self._events!r})"

    # -- connection -------------------------------------------------------------------------
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError(
                "the NATS backend runs on asyncio only: its driver, nats-py, has no support "
                "for trio or other event loops",
                hint="run stepsource under asyncio (anyio.run(..., backend='asyncio')), or "
                "use a sqlite:// or memory:// URL",
            ) from None

    def _where(self) -> str:
        return ", ".join(self.options.servers)

    def _unavailable(self, what: str, cause: object, hint: str | None = None) -> StepsourceError:
        return BackendUnavailableError(
            f"NATS at {self._where()} failed to {what} ({cause})",
            hint=hint
            or "check that nats-server runs there with JetStream enabled (-js) and is reachable",
        )

    async def _conn(self) -> Client:
        loop = self._running_loop()
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
                await self._create_streams(nc)
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
        nc = FastClient()
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
        return self._unavailable("accept a connection", text, hint)

    async def _create_streams(self, nc: Client) -> None:
        duplicate_window = 120 * _NS
        name = self.options.stream
        replicas = self.options.replicas or 1
        common = {"storage": "file", "num_replicas": replicas, "allow_direct": True}
        kv = {
            **common,
            "max_msgs_per_subject": 1,
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "discard": "new",
            "duplicate_window": duplicate_window,
        }
        configs = [
            {
                **common,
                "name": self._events,
                "subjects": [f"{name}.ev.>"],
                "deny_delete": True,
                "deny_purge": True,
                "duplicate_window": duplicate_window,
            },
            {
                **common,
                "name": self._inbox,
                "subjects": [f"{name}.in.>"],
                "duplicate_window": duplicate_window,
            },
            {**kv, "name": f"KV_{self._queue_bucket}", "subjects": [f"$KV.{self._queue_bucket}.>"]},
            {**kv, "name": f"KV_{self._meta_bucket}", "subjects": [f"$KV.{self._meta_bucket}.>"]},
            {**kv, "name": f"KV_{self._kv_bucket}", "subjects": [f"$KV.{self._kv_bucket}.>"]},
        ]
        found = 1
        for config in configs:
            stream = str(config["name"])
            try:
                info = await self._api(f"$JS.API.STREAM.CREATE.{stream}", config, nc=nc)
            except JsError as exc:
                if exc.err_code == 10074:
                    raise UsageError(
                        f"the NATS server at {self._where()} is not clustered: it cannot keep "
                        f"{replicas} replicas of the stream {stream}",
                        hint="drop replicas= from the URL (or use replicas=1)",
                    ) from None
                if exc.err_code != 10058:  # not "exists with another configuration"
                    raise self._unavailable(f"create the stream {stream}", exc) from None
                info = await self._api(f"$JS.API.STREAM.INFO.{stream}", {}, nc=nc)
                self._check_existing(config, info["config"])
            found = max(found, int(info["config"].get("num_replicas", 1)))
        self._replicas = found

    def _check_existing(self, wanted: dict[str, Any], actual: dict[str, Any]) -> None:
        stream = wanted["name"]
        if sorted(actual.get("subjects") or []) != sorted(wanted["subjects"]):
            raise UsageError(
                f"the JetStream stream {stream} exists with subjects {actual.get('subjects')}, "
                f"not {wanted['subjects']}",
                hint="it belongs to something else: choose another ?stream= name",
            )
        has = int(actual.get("num_replicas", 1))
        if self.options.replicas is not None and has != self.options.replicas:
            raise UsageError(
                f"the JetStream stream {stream} has {has} replicas, the URL asks for "
                f"{self.options.replicas}",
                hint="drop replicas= from the URL, or change the stream with the nats CLI",
            )

    async def open(self) -> None:
        await self._guard(self._conn(), "connect")

    async def aclose(self) -> None:
        self._running_loop()
        nc, self._nc = self._nc, None
        loop, self._loop = self._loop, None
        closer, self._closer = self._closer, None
        self._replies = None
        self._tails.clear()
        await self._drop_checks()
        if nc is not None and loop is asyncio.get_running_loop() and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()
        if closer is not None and loop is asyncio.get_running_loop():
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer

    # -- requests ---------------------------------------------------------------------------
    async def _guard(self, work: Awaitable[T], what: str) -> T:
        """Await ``work``; translate what escapes into the error tree."""
        try:
            self._running_loop()  # under trio: a clear UsageError, before anything runs
        except UsageError:
            if isinstance(work, Coroutine):
                work.close()
            raise
        try:
            return await work
        except StepsourceError:
            raise
        except (Transient, JsError, nats.errors.Error, OSError) as exc:
            raise self._unavailable(what, exc) from None

    async def _request(
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
                client = nc or await self._conn()
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
                    hint="store large payloads elsewhere, or raise max_payload on the server",
                )
            try:
                replies = await self._replies_for(client)
                reply = await replies.request(subject, payload, headers, self.request_timeout)
                if self.outage:  # one warning per outage, however many calls waited it out
                    self.outage = False
                    _logger.warning("the NATS server answers again: carrying on")
                return reply
            except nats.errors.MaxPayloadError:
                raise LimitExceededError(
                    f"a message of {len(payload)} bytes is larger than the server's max_payload",
                    hint="store large payloads elsewhere, or raise max_payload on the server",
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

    async def _api(
        self, subject: str, body: dict[str, Any], *, nc: Client | None = None
    ) -> dict[str, Any]:
        """A JetStream API call; errors become :class:`JsError` (transient ones retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay = 0.05
        while True:
            msg = await self._request(subject, json.dumps(body).encode(), nc=nc)
            reply: dict[str, Any] = json.loads(msg.data)
            error = reply.get("error")
            if error is None:
                return reply
            failure = JsError(
                int(error.get("code", 0)),
                int(error.get("err_code", 0)),
                error.get("description", ""),
            )
            if failure.code != 503 and failure.err_code not in _RETRY_CODES:
                raise failure
            if loop.time() + delay > deadline:
                raise Transient(str(failure))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], *, retry: bool = True
    ) -> int:
        """Publish into a stream and wait for the ack; return the message's sequence."""
        return self._ack_sequence(await self._request(subject, payload, headers, retry=retry))

    def _ack_sequence(self, ack: Any) -> int:
        """The sequence a publish acknowledgement gives, or its error raised."""
        if ack.headers and ack.headers.get("Status") == "503":
            raise Transient("no responders: the stream is not available")
        reply: dict[str, Any] = json.loads(ack.data)
        error = reply.get("error")
        if error is not None:
            code, err_code = int(error.get("code", 0)), int(error.get("err_code", 0))
            if code == 503 or err_code in _RETRY_CODES:
                raise Transient(error.get("description", "unavailable"))
            raise JsError(code, err_code, error.get("description", ""))
        return int(reply["seq"])

    async def _send(
        self, subject: str, payload: bytes, headers: dict[str, str], answer: asyncio.Future[Any]
    ) -> None:
        """Publish a request and return once it is on its way; its reply settles ``answer``
        (or ``TimeoutError`` does, after ``request_timeout``). Raises what kept it from being
        sent: :class:`LimitExceededError`, :class:`Transient` or a failed connect."""
        nc = await self._conn()
        size = len(payload) + sum(map(len, headers)) + sum(map(len, headers.values()))
        if size + 4 * len(headers) + 16 > nc.max_payload:
            raise LimitExceededError(
                f"a message of {size} bytes is larger than the server's max_payload of "
                f"{nc.max_payload}",
                hint="store large payloads elsewhere, or raise max_payload on the server",
            )
        try:
            replies = await self._replies_for(nc)
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
                hint="store large payloads elsewhere, or raise max_payload on the server",
            ) from None
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None

    async def _get(self, stream: str, body: dict[str, Any]) -> Stored | None:
        """One message (None if there is none), read so that it reflects every write this
        object saw acknowledged: a direct get on one replica, the leader's get on more."""
        await self._conn()  # the number of replicas is known once connected
        if self._replicas == 1:
            msg = await self._request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode())
            headers = dict(msg.headers or {})
            status = headers.get("Status")
            if status == "404":
                return None
            if status:
                raise Transient(f"direct get answered {status} {headers.get('Description')}")
            return Stored(int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data)
        try:
            reply = await self._api(f"$JS.API.STREAM.MSG.GET.{stream}", body)
        except JsError as exc:
            if exc.code == 404:
                return None
            raise
        message = reply["message"]
        raw_headers = base64.b64decode(message.get("hdrs") or b"")
        return Stored(
            int(message["seq"]),
            str(message["subject"]),
            parse_headers(raw_headers) if raw_headers else {},
            base64.b64decode(message.get("data") or b""),
        )

    async def _batch(self, stream: str, body: dict[str, Any]) -> tuple[list[Stored], bool]:
        """Up to ``body['batch']`` messages by one batched direct get; also whether more
        match after them. Served by any replica: it may lag behind the leader. Retried with
        backoff when no answer comes (a read changes nothing), and as :meth:`_request` does,
        when the connection cannot be made again after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay, failed = 0.02, False
        while True:
            try:
                return await self._batch_once(stream, body)
            except Transient:
                if loop.time() + delay > deadline:
                    raise
                failed = True
            except BackendUnavailableError:
                if not failed or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _replies_for(self, nc: Client) -> Replies:
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

    async def _batch_once(self, stream: str, body: dict[str, Any]) -> tuple[list[Stored], bool]:
        nc = await self._conn()
        try:
            replies = await self._replies_for(nc)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None
        token = replies.token()
        batch = replies.waiting[token] = Batch(asyncio.get_running_loop())
        try:
            await nc.publish(
                f"$JS.API.DIRECT.GET.{stream}",
                json.dumps(body).encode(),
                reply=f"{replies.prefix}.{token}",
            )
            while True:  # a timeout counts from the last message, as for one message
                seen = batch.seen
                await asyncio.wait((batch.done,), timeout=self.request_timeout)
                if batch.done.done():
                    return batch.done.result()
                if batch.seen == seen:
                    raise Transient("no answer to a batched direct get in time")
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None
        finally:
            replies.waiting.pop(token, None)

    async def stream_info(self) -> dict[str, Any]:
        """The event log's JetStream stream info (config, state, and on a cluster the
        ``cluster`` section naming its leader and replicas), as the server reports it."""
        info: dict[str, Any] = await self._guard(
            self._api(f"$JS.API.STREAM.INFO.{self._events}", {}), "describe the event log"
        )
        return info
