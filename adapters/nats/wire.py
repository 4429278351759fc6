"""What the NATS backend stores, byte for byte, and how its URL reads (no driver needed).

Kept apart from the modules of :mod:`stepsource.adapters.nats` that import the optional
``nats-py`` driver, so that a URL can be checked, and stored bytes decoded, without it.

**Subjects.** An execution id becomes one subject token: ids made of ``A-Z a-z 0-9 _ -``
are used as they are, any other id (dots, spaces, non-ASCII ...) is ``=`` followed by its
UTF-8 bytes in unpadded URL-safe base64 (``=`` never starts a plain token, so the mapping
is one-to-one and reversible). Every subject starts with the tenant's ``stream=`` name.

**Frames.** A commit is one message: ``SSE1``, the event count (u16), then per event the
topic (u16 length + UTF-8) and the data (u32 length + bytes, opaque). Its headers
``Stepsource-First-Version`` / ``Stepsource-Last-Version`` name its versions. An inbox item
is ``SSI1``, kind and name (u16 length + UTF-8 each), ``posted_ms`` (i64) and the data. A
definition is ``SSD1``, its version (u16 + UTF-8) and the data; a snapshot ``SSS1``, its
version (i64), topic (u16 + UTF-8) and the data. A queue row is a small JSON object.
All integers are big-endian.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

import orjson

from stepsource.errors import UsageError, mask_credentials

__all__ = [
    "BATCH",
    "EXPIRES_HEADER",
    "FIRST_HEADER",
    "LAST_HEADER",
    "MAX_EVENTS_PER_COMMIT",
    "NATS_FORMS",
    "POSITION_STRIDE",
    "WRONG_LAST",
    "JsError",
    "Layout",
    "NatsOptions",
    "QueueRow",
    "Stored",
    "Transient",
    "check_stream_name",
    "decode_commit",
    "decode_definition",
    "decode_inbox_item",
    "decode_row",
    "decode_snapshot",
    "decode_token",
    "encode_commit",
    "encode_definition",
    "encode_inbox_item",
    "encode_row",
    "encode_snapshot",
    "encode_token",
    "parse_nats_url",
]

#: a position is ``stream_sequence * POSITION_STRIDE + index of the event in its message``
POSITION_STRIDE = 1024
#: the most events one commit (one message) may carry, so positions never collide
MAX_EVENTS_PER_COMMIT = POSITION_STRIDE
FIRST_HEADER = "Stepsource-First-Version"
LAST_HEADER = "Stepsource-Last-Version"
#: a global key-value entry's expiry (epoch ms), absent when it never expires
EXPIRES_HEADER = "Stepsource-Expires-Ms"
#: the server's refusals of ``Nats-Expected-Last-Subject-Sequence``
WRONG_LAST = (10071, 10164)
#: messages asked for in one batched direct get
BATCH = 512

_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}")
_EVENTS = b"SSE1"
_INBOX = b"SSI1"
_DEFINITION = b"SSD1"
_SNAPSHOT = b"SSS1"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


# -- what the transport hands over (no driver types) --------------------------------------
class JsError(Exception):
    """A JetStream API error; the backend translates it before it reaches a caller."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, error {err_code})")
        self.code = code
        self.err_code = err_code
        self.description = description


class Transient(Exception):
    """A failure worth retrying: no answer in time, no responder, a reconnect."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message: its stream sequence, subject, headers and payload."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


class Layout:
    """The names of one tenant's streams, buckets and subjects (``stream=NAME`` in the URL;
    the package docstring of :mod:`stepsource.adapters.nats` lists them)."""

    __slots__ = (
        "events",
        "inbox",
        "kv_bucket",
        "kv_stream",
        "meta_bucket",
        "meta_stream",
        "queue_bucket",
        "queue_stream",
    )

    def __init__(self, stream: str) -> None:
        self.events = stream
        self.inbox = f"{stream}_inbox"
        self.queue_bucket = f"{stream}_queue"
        self.meta_bucket = f"{stream}_meta"
        self.kv_bucket = f"{stream}_kv"
        self.queue_stream = f"KV_{self.queue_bucket}"
        self.meta_stream = f"KV_{self.meta_bucket}"
        self.kv_stream = f"KV_{self.kv_bucket}"

    def event_subject(self, stream_id: str) -> str:
        return f"{self.events}.ev.{encode_token(stream_id)}"

    def inbox_subject(self, stream_id: str) -> str:
        return f"{self.events}.in.{encode_token(stream_id)}"

    def row_subject(self, stream_id: str) -> str:
        return f"$KV.{self.queue_bucket}.{encode_token(stream_id)}"

    def meta_subject(self, kind: str, identifier: str) -> str:
        return f"$KV.{self.meta_bucket}.{kind}.{encode_token(identifier)}"

    def kv_subject(self, key: str) -> str:
        return f"$KV.{self.kv_bucket}.{encode_token(key)}"


# -- subject tokens -------------------------------------------------------------------------
def encode_token(identifier: str) -> str:
    """One subject token for an execution or step id (see the module docstring)."""
    if _PLAIN_TOKEN.fullmatch(identifier):
        return identifier
    raw = base64.urlsafe_b64encode(identifier.encode("utf-8", "surrogatepass"))
    return "=" + raw.decode("ascii").rstrip("=")


def decode_token(token: str) -> str:
    """The id a token of :func:`encode_token` stands for."""
    if not token.startswith("="):
        return token
    body = token[1:]
    padded = body + "=" * (-len(body) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8", "surrogatepass")


# -- frames ---------------------------------------------------------------------------------
def _text(value: str, what: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > 0xFFFF:
        raise UsageError(f"{what} is {len(raw)} bytes long, more than 65535")
    return _U16.pack(len(raw)) + raw


class _Reader:
    """Reads a frame front to back; any overrun or leftover is a ValueError."""

    def __init__(self, payload: bytes, magic: bytes) -> None:
        if payload[: len(magic)] != magic:
            raise ValueError(f"not a {magic.decode()} frame")
        self.view = memoryview(payload)
        self.at = len(magic)

    def take(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.view):
            raise ValueError("truncated frame")
        chunk = bytes(self.view[self.at : end])
        self.at = end
        return chunk

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def i64(self) -> int:
        value: int = _I64.unpack(self.take(8))[0]
        return value

    def text(self) -> str:
        return self.take(self.u16()).decode("utf-8", "surrogatepass")

    def rest(self) -> bytes:
        chunk = bytes(self.view[self.at :])
        self.at = len(self.view)
        return chunk

    def end(self) -> None:
        if self.at != len(self.view):
            raise ValueError("trailing bytes after the frame")


def encode_commit(events: Sequence[tuple[str, bytes]]) -> bytes:
    """The payload of one commit: its events' topics and data, in version order."""
    parts = [_EVENTS, _U16.pack(len(events))]
    for topic, data in events:
        parts += [_text(topic, "an event topic"), _U32.pack(len(data)), data]
    return b"".join(parts)


def decode_commit(payload: bytes) -> list[tuple[str, bytes]]:
    """The ``(topic, data)`` of each event of a commit payload; ValueError if malformed.

    Every event the engine reads goes through here, so it reads the frame in place rather
    than through :class:`_Reader` (the same checks: no overrun, no trailing bytes)."""
    if payload[:4] != _EVENTS:
        raise ValueError(f"not a {_EVENTS.decode()} frame")
    size = len(payload)
    events = []
    try:
        (count,) = _U16.unpack_from(payload, 4)
        at = 6
        for _ in range(count):
            (length,) = _U16.unpack_from(payload, at)
            end = at + 2 + length
            if end > size:
                raise ValueError("truncated frame")
            topic = payload[at + 2 : end].decode("utf-8", "surrogatepass")
            (length,) = _U32.unpack_from(payload, end)
            at, end = end + 4, end + 4 + length
            if end > size:
                raise ValueError("truncated frame")
            events.append((topic, payload[at:end]))
            at = end
    except struct.error:
        raise ValueError("truncated frame") from None
    if at != size:
        raise ValueError("trailing bytes after the frame")
    return events


def encode_inbox_item(kind: str, name: str, data: bytes, posted_ms: int) -> bytes:
    head = [_INBOX, _text(kind, "an inbox kind"), _text(name, "an inbox name")]
    return b"".join([*head, _I64.pack(posted_ms), data])


def decode_inbox_item(payload: bytes) -> tuple[str, str, bytes, int]:
    """``(kind, name, data, posted_ms)`` of an inbox item payload."""
    reader = _Reader(payload, _INBOX)
    kind, name, posted = reader.text(), reader.text(), reader.i64()
    return kind, name, reader.rest(), posted


def encode_definition(version: str, data: bytes) -> bytes:
    return _DEFINITION + _text(version, "a step version") + data


def decode_definition(payload: bytes) -> tuple[str, bytes]:
    reader = _Reader(payload, _DEFINITION)
    version = reader.text()
    return version, reader.rest()


def encode_snapshot(version: int, topic: str, data: bytes) -> bytes:
    return _SNAPSHOT + _I64.pack(version) + _text(topic, "a snapshot topic") + data


def decode_snapshot(payload: bytes) -> tuple[int, str, bytes]:
    reader = _Reader(payload, _SNAPSHOT)
    version, topic = reader.i64(), reader.text()
    return version, topic, reader.rest()


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A work-queue row as the queue bucket stores it (one key per execution)."""

    step_id: str
    priority: int
    due_ms: int
    lease_owner: str | None = None
    lease_expires_ms: int = 0

    def runnable(self, now_ms: int) -> bool:
        free = self.lease_owner is None or self.lease_expires_ms < now_ms
        return free and self.due_ms <= now_ms


def encode_row(row: QueueRow) -> bytes:
    body = {
        "step": row.step_id,
        "priority": row.priority,
        "due": row.due_ms,
        "owner": row.lease_owner,
        "expires": row.lease_expires_ms,
    }
    return orjson.dumps(body)


def decode_row(payload: bytes) -> QueueRow:
    body = orjson.loads(payload)
    owner = body["owner"]
    return QueueRow(
        step_id=str(body["step"]),
        priority=int(body["priority"]),
        due_ms=int(body["due"]),
        lease_owner=None if owner is None else str(owner),
        lease_expires_ms=int(body["expires"]),
    )


# -- the URL --------------------------------------------------------------------------------
NATS_FORMS = (
    "a NATS URL reads nats://[user:password@]host[:port][,host[:port]...]"
    "[?stream=NAME&replicas=N&token=T&creds=/path/user.creds"
    "&tls_ca=/path&tls_cert=/path&tls_key=/path]"
)


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """What a ``nats://`` URL says: servers, the tenant's stream name and credentials."""

    servers: tuple[str, ...]
    stream: str = "STEPSOURCE"
    replicas: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise UsageError("a NATS backend needs at least one server", hint=NATS_FORMS)
        check_stream_name(self.stream)
        if self.replicas is not None and not 1 <= self.replicas <= 5:
            raise UsageError(f"replicas must be 1 to 5, not {self.replicas}", hint=NATS_FORMS)
        if self.token is not None and (self.user is not None or self.password is not None):
            raise UsageError("give a token or a user and password, not both", hint=NATS_FORMS)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("tls_cert and tls_key go together", hint=NATS_FORMS)


def check_stream_name(name: str) -> None:
    if not _STREAM_NAME.fullmatch(name):
        raise UsageError(
            f"the stream name {name!r} must be 1 to 48 of A-Z a-z 0-9 _ -",
            hint="It names the JetStream streams and prefixes every subject of this tenant",
        )


def _server(text: str) -> str:
    host, port = text, "4222"
    if text.startswith("["):  # [IPv6]:port
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unclosed [ in {text!r}")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad server {text!r}")
            port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or any(c in host for c in "/?#@ "):
        raise ValueError(f"bad host in {text!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"bad port in {text!r}")
    return f"{host}:{int(port)}"


def parse_nats_url(url: str) -> NatsOptions:
    """The options a ``nats://`` URL gives; :class:`UsageError` naming what is wrong."""

    def refuse(why: str) -> UsageError:
        shown = mask_credentials(url)  # never echo credentials
        return UsageError(f"bad backend URL {shown!r}: {why}", hint=NATS_FORMS)

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "nats":
        raise refuse("it is not a nats:// URL")
    location, _, query = rest.partition("?")
    location, _, path = location.partition("/")
    if path:
        raise refuse("a NATS URL has no path (name the stream with ?stream=NAME)")
    userinfo, at, hosts = location.rpartition("@")
    if not at:
        hosts, userinfo = location, ""
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user = unquote(name)
        password = unquote(secret) if colon else None
        if not user:
            raise refuse("the user name before @ is empty")
    if not hosts:
        raise refuse("it names no server")
    try:
        servers = tuple(_server(part) for part in hosts.split(","))
    except ValueError as exc:
        raise refuse(str(exc)) from None
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise refuse(f"its options cannot be read ({exc})") from None
    for key, value in pairs:
        if key in options:
            raise refuse(f"option {key!r} is given twice")
        if not value:
            raise refuse(f"option {key!r} has no value")
        options[key] = value
    stream = options.pop("stream", "STEPSOURCE")
    replicas_text = options.pop("replicas", None)
    replicas = None
    if replicas_text is not None:
        if not (replicas_text.isascii() and replicas_text.isdigit()):
            raise refuse(f"replicas must be a whole number, not {replicas_text!r}")
        replicas = int(replicas_text)
    known = ("token", "creds", "tls_ca", "tls_cert", "tls_key")
    extra = {key: options.pop(key) for key in known if key in options}
    if options:
        raise refuse(f"unknown option(s) {', '.join(sorted(options))}")
    try:
        return NatsOptions(servers, stream, replicas, user, password, **extra)
    except UsageError as exc:
        raise refuse(exc.reason) from None
