"""The distributed backend: NATS JetStream, for workers on many machines.

The only module that imports the ``nats-py`` driver (the ``nats`` extra); bytes on the wire
and the URL live in :mod:`stepsource.adapters.nats_wire`. nats-py runs on asyncio only:
under any other event loop every call raises :class:`UsageError`.

**Layout.** For the tenant ``stream=NAME`` (default ``STEPSOURCE``):

- stream ``NAME``, subjects ``NAME.ev.<execution>``: the event log, one message per commit
  (all its events, headers naming the first and last version); no deletes, no purges;
- stream ``NAME_inbox``, subjects ``NAME.in.<execution>``: inbox items, the message sequence
  is the item id;
- KV bucket ``NAME_queue``: one key per queued execution (step, priority, due, lease);
- KV bucket ``NAME_meta``: published definitions (``def.<step>``) and snapshots
  (``snap.<execution>``).

**Appends** are guarded by ``Nats-Expected-Last-Subject-Sequence``: the sequence of the
message that holds ``expected_version`` comes from a per-execution cache of this object's
own appends and reads, else from the subject's last message. Codes 10071/10164 are a
version conflict; 10163 and lost connections are retried with backoff. Each publish carries
a unique ``Nats-Msg-Id``; when an acknowledgement was lost and the retry is refused, the
message after the expected one is read back: if it carries that id, the commit was stored.
Concurrent appends are pipelined: each caller publishes at once and awaits only its own
ack, so commits of many actors share the connection's write buffer and round trips.

**Positions** are ``stream sequence * 1024 + index of the event in its message``: a commit
holds at most 1024 events; positions grow in commit order, with gaps between commits.

**Work queue.** Rows are changed by compare-and-set on the key's revision, so a lease is
atomic across processes. Each object mirrors the queue bucket in memory and catches up
(one batched direct get of what changed) before it leases or answers ``next_due_ms``; its
own writes enter the mirror at once.

**Not atomic with a commit** (JetStream has no multi-subject transaction), each safe:

- the lease check of ``Commit.lease_owner`` is read just before publishing: a zombie that
  passes it still fails the append, because the new holder's first append (StepLeased)
  moved the subject's last sequence;
- consumed inbox items are deleted after the commit is stored: a crash in between leaves
  items the engine already moved into the stream, and it skips those by id;
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
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from stepsource.adapters._rules import (
    check_commit,
    check_kv_key,
    check_kv_write,
    check_post,
    kv_expires_ms,
    kv_live,
    lease_conflict,
    queued_due_ms,
    version_conflict,
    wake_ms,
)
from stepsource.adapters.nats_wire import (
    FIRST_HEADER,
    LAST_HEADER,
    MAX_EVENTS_PER_COMMIT,
    POSITION_STRIDE,
    NatsOptions,
    QueueRow,
    decode_commit,
    decode_definition,
    decode_inbox_item,
    decode_row,
    decode_snapshot,
    decode_token,
    encode_commit,
    encode_definition,
    encode_inbox_item,
    encode_row,
    encode_snapshot,
    encode_token,
    parse_nats_url,
)
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    LimitExceededError,
    StepsourceError,
    UsageError,
)

__all__ = ["NatsBackend"]

T = TypeVar("T")
_logger = logging.getLogger("stepsource.nats")
_RESERVE = 16 * 1024  # of max_payload, for headers and framing
_WRONG_LAST = (10071, 10164)
_RETRY_CODES = (10163, 10008, 10009)  # try again; cluster not ready; not the leader
_BATCH = 512
_TAILS = 50_000  # executions whose last known message this object remembers
_NS = 1_000_000_000
_EXPIRES_HEADER = "Stepsource-Expires-Ms"


class _JsError(Exception):
    """A JetStream API error (never escapes this module)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, error {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


class _Transient(Exception):
    """A failure worth retrying: no answer in time, no responder, a reconnect."""


@dataclass(frozen=True, slots=True)
class _Stored:
    """One stored message: its stream sequence, subject, headers and payload."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


@dataclass(frozen=True, slots=True)
class _Tail:
    """The last message of an execution's subject that this object knows of."""

    seq: int
    first_version: int
    last_version: int

    @property
    def position(self) -> int:
        return self.seq * POSITION_STRIDE + self.last_version - self.first_version


_HEADER_PARSER = BytesHeaderParser()


def _parse_headers(raw: bytes) -> dict[str, str]:
    """Headers of a ``NATS/1.0`` header block (as STREAM.MSG.GET returns them)."""
    _, _, rest = raw.partition(b"\r\n")
    return {key: str(value) for key, value in _HEADER_PARSER.parsebytes(rest).items()}


class NatsBackend(Backend):
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
        self._tails: OrderedDict[str, _Tail] = OrderedDict()
        self._rows: dict[str, tuple[int, QueueRow | None]] = {}  # the queue mirror
        self._rows_seen = 0  # the queue bucket's stream sequence the mirror has read up to

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
        errors: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            _logger.debug("nats: %s", exc)

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
        try:
            return await nats.connect(
                servers=[f"nats://{server}" for server in options.servers],
                name="stepsource",
                connect_timeout=2,
                reconnect_time_wait=0.2,
                max_reconnect_attempts=2,
                error_cb=on_error,
                disconnected_cb=quiet,
                closed_cb=quiet,
                **kwargs,
            )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            cause = errors[-1] if errors else exc
            text = str(cause) or type(cause).__name__
            hint = None
            if "authorization" in text.lower() or "authentication" in text.lower():
                hint = (
                    "the server refused the credentials: give user:password@ in the URL, "
                    "?token=..., or ?creds=/path/to/user.creds"
                )
            raise self._unavailable("accept a connection", text, hint) from None

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
            except _JsError as exc:
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
        self._tails.clear()
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
            return await work
        except StepsourceError:
            raise
        except (_Transient, _JsError, nats.errors.Error, OSError) as exc:
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
        """One request/reply, retried with backoff on transient failures (if ``retry``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay = 0.02
        while True:
            client = nc or await self._conn()
            size = len(payload) + sum(len(k) + len(v) + 4 for k, v in (headers or {}).items())
            if size + 16 > client.max_payload:
                raise LimitExceededError(
                    f"a message of {size} bytes is larger than the server's max_payload of "
                    f"{client.max_payload}",
                    hint="store large payloads elsewhere, or raise max_payload on the server",
                )
            try:
                return await client.request(
                    subject, payload, timeout=self.request_timeout, headers=headers
                )
            except nats.errors.MaxPayloadError:
                raise LimitExceededError(
                    f"a message of {len(payload)} bytes is larger than the server's max_payload",
                    hint="store large payloads elsewhere, or raise max_payload on the server",
                ) from None
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                if not retry or loop.time() + delay > deadline:
                    raise _Transient(str(exc) or type(exc).__name__) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _api(
        self, subject: str, body: dict[str, Any], *, nc: Client | None = None
    ) -> dict[str, Any]:
        """A JetStream API call; errors become :class:`_JsError` (transient ones retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay = 0.05
        while True:
            msg = await self._request(subject, json.dumps(body).encode(), nc=nc)
            reply: dict[str, Any] = json.loads(msg.data)
            error = reply.get("error")
            if error is None:
                return reply
            failure = _JsError(
                int(error.get("code", 0)),
                int(error.get("err_code", 0)),
                error.get("description", ""),
            )
            if failure.code != 503 and failure.err_code not in _RETRY_CODES:
                raise failure
            if loop.time() + delay > deadline:
                raise _Transient(str(failure))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str], *, retry: bool = True
    ) -> int:
        """Publish into a stream and wait for the ack; return the message's sequence."""
        msg = await self._request(subject, payload, headers, retry=retry)
        reply: dict[str, Any] = json.loads(msg.data)
        error = reply.get("error")
        if error is not None:
            code, err_code = int(error.get("code", 0)), int(error.get("err_code", 0))
            if code == 503 or err_code in _RETRY_CODES:
                raise _Transient(error.get("description", "unavailable"))
            raise _JsError(code, err_code, error.get("description", ""))
        return int(reply["seq"])

    async def _publish_if(
        self, stream: str, subject: str, payload: bytes, headers: dict[str, str], expect: int
    ) -> int | None:
        """Publish only if the subject's last message is still ``expect`` (0: none); the new
        sequence, or None if another write came first. A retry after a lost ack that is
        refused reads the subject back: if its last message is ours, the write happened."""
        msg_id = uuid.uuid4().hex
        headers = {
            **headers,
            "Nats-Msg-Id": msg_id,
            "Nats-Expected-Last-Subject-Sequence": str(expect),
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay, unsure = 0.02, False
        while True:
            try:
                return await self._publish(subject, payload, headers, retry=False)
            except _JsError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
                if unsure:
                    last = await self._get(stream, {"last_by_subj": subject})
                    if last is not None and last.headers.get("Nats-Msg-Id") == msg_id:
                        return last.seq
                return None
            except _Transient:
                unsure = True
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _get(self, stream: str, body: dict[str, Any]) -> _Stored | None:
        """One message (None if there is none), read so that it reflects every write this
        object saw acknowledged: a direct get on one replica, the leader's get on more."""
        if self._replicas == 1:
            msg = await self._request(f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode())
            headers = dict(msg.headers or {})
            status = headers.get("Status")
            if status == "404":
                return None
            if status:
                raise _Transient(f"direct get answered {status} {headers.get('Description')}")
            return _Stored(
                int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data
            )
        try:
            reply = await self._api(f"$JS.API.STREAM.MSG.GET.{stream}", body)
        except _JsError as exc:
            if exc.code == 404:
                return None
            raise
        message = reply["message"]
        raw_headers = base64.b64decode(message.get("hdrs") or b"")
        return _Stored(
            int(message["seq"]),
            str(message["subject"]),
            _parse_headers(raw_headers) if raw_headers else {},
            base64.b64decode(message.get("data") or b""),
        )

    async def _batch(self, stream: str, body: dict[str, Any]) -> tuple[list[_Stored], bool]:
        """Up to ``body['batch']`` messages by one batched direct get; also whether more
        match after them. Served by any replica: it may lag behind the leader."""
        nc = await self._conn()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        found: list[_Stored] = []
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=self.request_timeout)
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status == "404":
                    return found, False
                if status == "204":
                    return found, int(headers.get("Nats-Num-Pending", "0")) > 0
                if status:
                    raise _Transient(f"direct get answered {status} {headers.get('Description')}")
                found.append(
                    _Stored(
                        int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data
                    )
                )
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            raise _Transient(str(exc) or type(exc).__name__) from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- the log ----------------------------------------------------------------------------
    def _event_subject(self, stream_id: str) -> str:
        return f"{self._events}.ev.{encode_token(stream_id)}"

    def _remember(self, stream_id: str, tail: _Tail) -> None:
        known = self._tails.get(stream_id)
        if known is None or known.seq < tail.seq:
            self._tails[stream_id] = tail
        self._tails.move_to_end(stream_id)
        while len(self._tails) > _TAILS:
            self._tails.popitem(last=False)

    def _expand(self, stored: _Stored) -> list[RecordedEvent]:
        prefix = f"{self._events}.ev."
        try:
            stream_id = decode_token(stored.subject.removeprefix(prefix))
            first = int(stored.headers[FIRST_HEADER])
            last = int(stored.headers[LAST_HEADER])
            events = decode_commit(stored.data)
            if len(events) != last - first + 1:
                raise ValueError(f"{len(events)} events for versions {first}..{last}")
        except (KeyError, ValueError) as exc:
            raise CorruptLogError(
                f"message {stored.seq} of the JetStream stream {self._events} is not a "
                f"stepsource commit ({exc})",
                hint="something else published into this stream's subjects: remove it, or "
                "use another ?stream= name",
            ) from None
        base = stored.seq * POSITION_STRIDE
        return [
            RecordedEvent(stream_id, first + index, topic, data, base + index)
            for index, (topic, data) in enumerate(events)
        ]

    async def _last_commit(self, stream_id: str) -> _Tail | None:
        """The last message of the execution's subject, read from the stream's leader."""
        stored = await self._get(self._events, {"last_by_subj": self._event_subject(stream_id)})
        if stored is None:
            return None
        events = self._expand(stored)
        tail = _Tail(stored.seq, events[0].version, events[-1].version)
        self._remember(stream_id, tail)
        return tail

    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.max_commit_bytes)
        if len(commit.events) > MAX_EVENTS_PER_COMMIT:
            raise LimitExceededError(
                f"the commit holds {len(commit.events)} events, more than the NATS backend's "
                f"limit of {MAX_EVENTS_PER_COMMIT}",
                execution_id=commit.stream_id,
                hint="commit the events in smaller groups",
            )
        result: int = await self._guard(self._append(commit), "append to the event log")
        return result

    async def _append(self, commit: Commit) -> int:
        await self._conn()
        stream_id = commit.stream_id
        known = self._tails.get(stream_id)
        tail: _Tail | None
        if commit.expected_version == 0 and commit.events:
            tail = None  # "no message on the subject" is the check itself
        elif known is not None and known.last_version == commit.expected_version and commit.events:
            tail = known
        else:
            tail = await self._last_commit(stream_id)
            current = tail.last_version if tail is not None else 0
            if current != commit.expected_version:
                raise version_conflict(commit, current)
        if commit.lease_owner is not None:
            row = await self._fetch_row(stream_id)
            holder = row[1].lease_owner if row is not None and row[1] is not None else None
            if holder != commit.lease_owner:
                raise lease_conflict(commit, holder)
        if commit.events:
            seq = await self._publish_commit(commit, tail.seq if tail is not None else 0)
            tail = _Tail(seq, commit.events[0].version, commit.events[-1].version)
            self._remember(stream_id, tail)
        try:
            if commit.consumed:
                await self._delete_items(stream_id, commit.consumed)
            if commit.queue is not None:
                await self._apply_queue(commit)
        except (_Transient, _JsError) as exc:
            raise BackendUnavailableError(
                f"the commit is stored, but updating the inbox or work queue after it failed "
                f"({exc})",
                execution_id=stream_id,
                hint="the execution resumes by replay once its lease expires",
            ) from None
        return tail.position if tail is not None else 0

    async def _publish_commit(self, commit: Commit, expected_seq: int) -> int:
        first, last = commit.events[0].version, commit.events[-1].version
        subject = self._event_subject(commit.stream_id)
        msg_id = f"{encode_token(commit.stream_id)}:{first}:{uuid.uuid4().hex}"
        headers = {
            "Nats-Msg-Id": msg_id,
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            FIRST_HEADER: str(first),
            LAST_HEADER: str(last),
        }
        payload = encode_commit([(event.topic, event.data) for event in commit.events])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        delay, unsure = 0.02, False
        while True:
            try:
                return await self._publish(subject, payload, headers, retry=False)
            except _JsError as exc:
                if exc.err_code not in _WRONG_LAST:
                    raise
                if unsure:  # was it our own earlier attempt whose ack was lost?
                    found = await self._get(
                        self._events, {"seq": expected_seq + 1, "next_by_subj": subject}
                    )
                    if found is not None and found.headers.get("Nats-Msg-Id") == msg_id:
                        return found.seq
                latest = await self._last_commit(commit.stream_id)
                raise version_conflict(
                    commit, latest.last_version if latest is not None else 0
                ) from None
            except LimitExceededError as exc:
                raise LimitExceededError(
                    exc.reason, execution_id=commit.stream_id, hint=exc.hint
                ) from None
            except _Transient as exc:
                unsure = True
                if loop.time() + delay > deadline:
                    raise BackendUnavailableError(
                        f"NATS at {self._where()} did not acknowledge the commit ({exc}); it "
                        "may or may not be stored",
                        execution_id=commit.stream_id,
                        hint="read the stream's version before appending again",
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        start = max(from_version, 1)
        if to_version is not None and to_version < start:
            return []
        result: list[RecordedEvent] = await self._guard(
            self._read_stream(stream_id, start, to_version), "read an execution's events"
        )
        return result

    async def _read_stream(
        self, stream_id: str, start: int, stop: int | None
    ) -> list[RecordedEvent]:
        subject = self._event_subject(stream_id)
        known = self._tails.get(stream_id)
        seq = known.seq if known is not None and known.first_version <= start else 1
        upto: int | None = None  # on replicas, read until the leader's last message
        if self._replicas > 1:
            last = await self._last_commit(stream_id)
            if last is None:
                return []
            upto = last.seq
        found: list[RecordedEvent] = []
        while True:
            batch, more = await self._batch(
                self._events, {"seq": seq, "next_by_subj": subject, "batch": _BATCH}
            )
            if upto is not None and not more and (not batch or batch[-1].seq < upto):
                batch = await self._leader_catch_up(subject, batch, seq, upto)
            for stored in batch:
                found.extend(
                    event
                    for event in self._expand(stored)
                    if event.version >= start and (stop is None or event.version <= stop)
                )
            if not batch:
                break
            tail_events = self._expand(batch[-1])
            if not more:
                self._remember(
                    stream_id,
                    _Tail(batch[-1].seq, tail_events[0].version, tail_events[-1].version),
                )
                break
            if stop is not None and tail_events[-1].version >= stop:
                break
            seq = batch[-1].seq + 1
        if any(event.version != start + n for n, event in enumerate(found)):
            raise CorruptLogError(
                f"the execution's versions from {start} have a gap in the JetStream stream "
                f"{self._events}",
                execution_id=stream_id,
                hint="messages were removed outside stepsource: restore the stream",
            )
        return found

    async def _leader_catch_up(
        self, subject: str, batch: list[_Stored], seq: int, upto: int
    ) -> list[_Stored]:
        """A replica answered behind the leader: read the rest from the leader itself."""
        batch = list(batch)
        after = batch[-1].seq + 1 if batch else seq
        while after <= upto:
            stored = await self._get(self._events, {"seq": after, "next_by_subj": subject})
            if stored is None or stored.seq > upto:
                break
            batch.append(stored)
            after = stored.seq + 1
        return batch

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if limit <= 0:
            return []
        result: list[RecordedEvent] = await self._guard(
            self._read_all(max(after_position, 0), limit), "read the event log"
        )
        return result

    async def _read_all(self, after: int, limit: int) -> list[RecordedEvent]:
        seq = max(after // POSITION_STRIDE, 1)
        found: list[RecordedEvent] = []
        while len(found) < limit:
            batch, more = await self._batch(
                self._events, {"seq": seq, "batch": min(limit - len(found) + 1, _BATCH)}
            )
            for stored in batch:
                found.extend(e for e in self._expand(stored) if e.position > after)
            if not batch or not more:
                break
            seq = batch[-1].seq + 1
        return found[:limit]

    async def stream_version(self, stream_id: str) -> int:
        tail = await self._guard(self._last_commit(stream_id), "read an execution's version")
        return 0 if tail is None else int(tail.last_version)

    async def max_position(self) -> int:
        result: int = await self._guard(self._max_position(), "read the event log's end")
        return result

    async def _max_position(self) -> int:
        info = await self._api(f"$JS.API.STREAM.INFO.{self._events}", {})
        last = int(info["state"].get("last_seq", 0))
        if last == 0:
            return 0
        stored = await self._get(self._events, {"seq": last})
        if stored is None:
            return 0
        return self._expand(stored)[-1].position

    async def stream_info(self) -> dict[str, Any]:
        """The event log's JetStream stream info (config, state, and on a cluster the
        ``cluster`` section naming its leader and replicas), as the server reports it."""
        info: dict[str, Any] = await self._guard(
            self._api(f"$JS.API.STREAM.INFO.{self._events}", {}), "describe the event log"
        )
        return info

    # -- the work queue ---------------------------------------------------------------------
    def _row_subject(self, stream_id: str) -> str:
        return f"$KV.{self._queue_bucket}.{encode_token(stream_id)}"

    def _mirror(self, stream_id: str, revision: int, row: QueueRow | None) -> None:
        known = self._rows.get(stream_id)
        if known is None or known[0] < revision:
            self._rows[stream_id] = (revision, row)

    @staticmethod
    def _row_of(stored: _Stored) -> QueueRow | None:
        if stored.headers.get("KV-Operation") in ("DEL", "PURGE") or not stored.data:
            return None
        try:
            return decode_row(stored.data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptLogError(
                f"the queue entry {stored.subject} is not a stepsource queue row ({exc})",
                hint="something else wrote into this bucket: use another ?stream= name",
            ) from None

    async def _fetch_row(self, stream_id: str) -> tuple[int, QueueRow | None] | None:
        """The execution's queue row and revision as the server has it now (or None)."""
        stored = await self._get(
            f"KV_{self._queue_bucket}", {"last_by_subj": self._row_subject(stream_id)}
        )
        if stored is None:
            return None
        row = self._row_of(stored)
        self._mirror(stream_id, stored.seq, row)
        return stored.seq, row

    async def _sync_queue(self) -> None:
        """Catch the mirror up with every queue change since it last looked."""
        prefix = f"$KV.{self._queue_bucket}."
        while True:
            batch, more = await self._batch(
                f"KV_{self._queue_bucket}", {"seq": self._rows_seen + 1, "batch": _BATCH}
            )
            for stored in batch:
                self._mirror(
                    decode_token(stored.subject.removeprefix(prefix)),
                    stored.seq,
                    self._row_of(stored),
                )
                self._rows_seen = max(self._rows_seen, stored.seq)
            if not batch or not more:
                return

    async def _put_row(
        self, stream_id: str, row: QueueRow | None, expect: int | None
    ) -> int | None:
        """Write (or, with None, delete) the row; with ``expect``, only if the row's revision
        is still that (0: no row). The new revision, or None if another write came first."""
        headers = {"KV-Operation": "DEL"} if row is None else {}
        subject = self._row_subject(stream_id)
        payload = b"" if row is None else encode_row(row)
        if expect is None:
            revision: int | None = await self._publish(subject, payload, headers)
        else:
            revision = await self._publish_if(
                f"KV_{self._queue_bucket}", subject, payload, headers, expect
            )
        if revision is not None:
            self._mirror(stream_id, revision, row)
        return revision

    async def _current(self, stream_id: str) -> tuple[int, QueueRow | None]:
        """The mirrored row (a guess for compare-and-set), else the server's."""
        known = self._rows.get(stream_id)
        if known is not None:
            return known
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        wanted = set(step_ids)
        if not wanted or limit <= 0:
            return []
        result: list[Lease] = await self._guard(
            self._lease(worker_id, wanted, now_ms, lease_ms, limit), "lease executions"
        )
        return result

    async def _lease(
        self, worker_id: str, wanted: set[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        await self._sync_queue()
        candidates = sorted(
            (-row.priority, row.due_ms, stream_id)
            for stream_id, (_, row) in self._rows.items()
            if row is not None and row.step_id in wanted and row.runnable(now_ms)
        )
        leases: list[Lease] = []
        expires = now_ms + lease_ms
        for _, _, stream_id in candidates:
            if len(leases) >= limit:
                break
            revision, row = self._rows[stream_id]
            while row is not None and row.step_id in wanted and row.runnable(now_ms):
                mine = replace(row, lease_owner=worker_id, lease_expires_ms=expires)
                if await self._put_row(stream_id, mine, revision) is not None:
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
                revision, row = await self._current_after_miss(stream_id)
                if row == mine:  # our own write, whose ack was lost
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
        return leases

    async def _current_after_miss(self, stream_id: str) -> tuple[int, QueueRow | None]:
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        result: list[str] = await self._guard(
            self._renew(worker_id, stream_ids, now_ms, lease_ms), "renew leases"
        )
        return result

    async def _renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        held = []
        for stream_id in dict.fromkeys(stream_ids):
            revision, row = await self._current(stream_id)
            while row is not None and row.lease_owner == worker_id:
                renewed = replace(row, lease_expires_ms=now_ms + lease_ms)
                if row == renewed or await self._put_row(stream_id, renewed, revision):
                    held.append(stream_id)
                    break
                revision, row = await self._current_after_miss(stream_id)
        return held

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self._guard(self._release(worker_id, stream_id, due_ms), "release a lease")

    async def _release(self, worker_id: str, stream_id: str, due_ms: int | None) -> None:
        revision, row = await self._current(stream_id)
        while row is not None and row.lease_owner == worker_id:
            free = replace(
                row,
                lease_owner=None,
                lease_expires_ms=0,
                due_ms=row.due_ms if due_ms is None else due_ms,
            )
            if await self._put_row(stream_id, free, revision) is not None:
                return
            revision, row = await self._current_after_miss(stream_id)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        wanted = set(step_ids)
        if not wanted:
            return None
        await self._guard(self._sync_queue(), "read the work queue")
        dues = [
            wake_ms(row.due_ms, row.lease_owner, row.lease_expires_ms)
            for _, row in self._rows.values()
            if row is not None and row.step_id in wanted
        ]
        return min(dues, default=None)

    async def _apply_queue(self, commit: Commit) -> None:
        update = commit.queue
        assert update is not None
        stream_id = commit.stream_id
        if update.kind == "done":
            await self._put_row(stream_id, None, None)
            return
        if update.kind == "enqueue":
            await self._put_row(
                stream_id, QueueRow(update.step_id, update.priority, update.due_ms), None
            )
            return
        revision, _ = await self._current(stream_id)  # suspend: read, look at the inbox, CAS
        while True:
            pending = await self._inbox_pending(stream_id)
            row = QueueRow(update.step_id, update.priority, queued_due_ms(update, pending))
            if await self._put_row(stream_id, row, revision) is not None:
                return
            revision, _ = await self._current_after_miss(stream_id)

    # -- the inbox --------------------------------------------------------------------------
    def _inbox_subject(self, stream_id: str) -> str:
        return f"{self._events}.in.{encode_token(stream_id)}"

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        payload = encode_inbox_item(kind, name, bytes(data), now_ms)
        result: int = await self._guard(self._post(stream_id, payload, now_ms), "post to an inbox")
        return result

    async def _post(self, stream_id: str, payload: bytes, now_ms: int) -> int:
        await self._conn()
        try:
            item_id = await self._publish(
                self._inbox_subject(stream_id), payload, {"Nats-Msg-Id": uuid.uuid4().hex}
            )
        except LimitExceededError as exc:
            raise LimitExceededError(exc.reason, execution_id=stream_id, hint=exc.hint) from None
        # touch the row even when its due time stays: a suspend racing this post then fails
        # its compare-and-set and looks at the inbox again
        fetched = await self._fetch_row(stream_id)
        revision, row = fetched if fetched is not None else (0, None)
        while row is not None:
            woken = replace(row, due_ms=min(row.due_ms, now_ms))
            if await self._put_row(stream_id, woken, revision) is not None:
                break
            revision, row = await self._current_after_miss(stream_id)
        return item_id

    async def _inbox_pending(self, stream_id: str) -> bool:
        found = await self._get(self._inbox, {"last_by_subj": self._inbox_subject(stream_id)})
        return found is not None

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        result: list[InboxItem] = await self._guard(
            self._read_inbox(stream_id, after_id, limit), "read an inbox"
        )
        return result

    async def _read_inbox(self, stream_id: str, after_id: int, limit: int) -> list[InboxItem]:
        subject = self._inbox_subject(stream_id)
        seq = max(after_id + 1, 1)
        items: list[InboxItem] = []
        while len(items) < limit:
            batch, more = await self._batch(
                self._inbox,
                {"seq": seq, "next_by_subj": subject, "batch": min(limit - len(items), _BATCH)},
            )
            for stored in batch:
                try:
                    kind, name, data, posted = decode_inbox_item(stored.data)
                except ValueError as exc:
                    raise CorruptLogError(
                        f"inbox message {stored.seq} in {self._inbox} is not a stepsource "
                        f"inbox item ({exc})",
                        execution_id=stream_id,
                    ) from None
                items.append(InboxItem(stored.seq, stream_id, kind, name, data, posted))
            if not batch or not more:
                break
            seq = batch[-1].seq + 1
        return items[:limit]

    async def _delete_items(self, stream_id: str, item_ids: Sequence[int]) -> None:
        subject = self._inbox_subject(stream_id)
        for item_id in dict.fromkeys(item_ids):
            if item_id <= 0:
                continue
            stored = await self._get(self._inbox, {"seq": item_id})
            if stored is None or stored.subject != subject:
                continue  # gone already, or another execution's item
            try:
                await self._api(
                    f"$JS.API.STREAM.MSG.DELETE.{self._inbox}", {"seq": item_id, "no_erase": True}
                )
            except _JsError as exc:
                if exc.code != 404 and exc.err_code not in (10037, 10057):
                    raise

    # -- published step definitions and snapshots (the meta bucket) -------------------------
    def _meta_subject(self, kind: str, identifier: str) -> str:
        return f"$KV.{self._meta_bucket}.{kind}.{encode_token(identifier)}"

    async def _meta_put(self, subject: str, payload: bytes, expect: int | None) -> bool:
        if expect is None:
            await self._publish(subject, payload, {})
            return True
        stream = f"KV_{self._meta_bucket}"
        return await self._publish_if(stream, subject, payload, {}, expect) is not None

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        payload = encode_definition(version, bytes(data))
        await self._guard(
            self._meta_put(self._meta_subject("def", step_id), payload, None),
            "publish a step definition",
        )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        stored: _Stored | None = await self._guard(
            self._get(
                f"KV_{self._meta_bucket}", {"last_by_subj": self._meta_subject("def", step_id)}
            ),
            "read a step definition",
        )
        if stored is None or not stored.data:
            return None
        try:
            return decode_definition(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the published definition of {step_id!r} is damaged ({exc})"
            ) from None

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        payload = encode_snapshot(snapshot.version, snapshot.topic, bytes(snapshot.data))
        await self._guard(self._save_snapshot(snapshot, payload), "save a snapshot")

    async def _save_snapshot(self, snapshot: Snapshot, payload: bytes) -> None:
        subject = self._meta_subject("snap", snapshot.stream_id)
        while True:
            stored = await self._get(f"KV_{self._meta_bucket}", {"last_by_subj": subject})
            if stored is not None and stored.data:
                kept = self._snapshot_of(snapshot.stream_id, stored)
                if kept.version > snapshot.version:
                    return
            try:
                done = await self._meta_put(subject, payload, stored.seq if stored else 0)
            except LimitExceededError as exc:
                raise LimitExceededError(
                    exc.reason, execution_id=snapshot.stream_id, hint=exc.hint
                ) from None
            if done:
                return

    def _snapshot_of(self, stream_id: str, stored: _Stored) -> Snapshot:
        try:
            version, topic, data = decode_snapshot(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the snapshot of the execution is damaged ({exc})", execution_id=stream_id
            ) from None
        return Snapshot(stream_id, version, topic, data)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        stored: _Stored | None = await self._guard(
            self._get(
                f"KV_{self._meta_bucket}", {"last_by_subj": self._meta_subject("snap", stream_id)}
            ),
            "read a snapshot",
        )
        if stored is None or not stored.data:
            return None
        snapshot = self._snapshot_of(stream_id, stored)
        if max_version is not None and snapshot.version > max_version:
            return None
        return snapshot

    # -- the global key-value store (its own bucket) ----------------------------------------
    def _kv_subject(self, key: str) -> str:
        return f"$KV.{self._kv_bucket}.{encode_token(key)}"

    async def _kv_current(self, key: str) -> tuple[int, KVEntry | None]:
        """The key's last message (its sequence, 0 if none) and its entry (None if deleted);
        expiry is the caller's to judge."""
        stored = await self._get(f"KV_{self._kv_bucket}", {"last_by_subj": self._kv_subject(key)})
        if stored is None:
            return 0, None
        if stored.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return stored.seq, None
        expires = stored.headers.get(_EXPIRES_HEADER)
        entry = KVEntry(key, stored.data, stored.seq, None if expires is None else int(expires))
        return stored.seq, entry

    async def _kv_write(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None, expect: int | None
    ) -> KVEntry | None:
        expires = kv_expires_ms(now_ms, ttl_ms)
        headers = {} if expires is None else {_EXPIRES_HEADER: str(expires)}
        subject = self._kv_subject(key)
        if expect is None:
            revision: int | None = await self._publish(subject, bytes(data), headers)
        else:
            revision = await self._publish_if(
                f"KV_{self._kv_bucket}", subject, bytes(data), headers, expect
            )
        return None if revision is None else KVEntry(key, bytes(data), revision, expires)

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        check_kv_key(key, now_ms)
        _, entry = await self._guard(self._kv_current(key), "read a key-value entry")
        if entry is None or not kv_live(entry.expires_ms, now_ms):
            return None
        return entry

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes)
        entry = await self._guard(
            self._kv_write(key, data, now_ms, ttl_ms, None), "write a key-value entry"
        )
        assert entry is not None
        return entry

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        check_kv_write(key, data, now_ms, ttl_ms, self.max_commit_bytes, expected_revision)
        result: KVEntry | None = await self._guard(
            self._kv_cas(key, expected_revision, data, now_ms, ttl_ms),
            "compare-and-set a key-value entry",
        )
        return result

    async def _kv_cas(
        self, key: str, expected: int | None, data: bytes, now_ms: int, ttl_ms: int | None
    ) -> KVEntry | None:
        last, entry = await self._kv_current(key)
        live = entry is not None and kv_live(entry.expires_ms, now_ms)
        if (expected is None and live) or (expected is not None and (not live or last != expected)):
            return None
        # the server checks the key's last message is still the one judged here
        return await self._kv_write(key, data, now_ms, ttl_ms, last)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        check_kv_key(key, now_ms)
        await self._guard(self._kv_delete(key), "delete a key-value entry")

    async def _kv_delete(self, key: str) -> None:
        _, entry = await self._kv_current(key)
        if entry is not None:
            await self._publish(self._kv_subject(key), b"", {"KV-Operation": "DEL"})
