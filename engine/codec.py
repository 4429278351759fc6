"""Domain events <-> stored bytes: eventsourcing's Mapper with an orjson transcoder.

Stored data is JSON only (orjson); topics are the events' explicit stable topics; an event of
an older ``class_version`` is upcast by the Mapper. Payload encryption at rest is the
eventsourcing AES cipher, switched on by a key. Decoding problems become
:class:`~stepsource.errors.UnknownEventError` naming the stream, version and what to do.
"""

from __future__ import annotations

import functools
import types
import typing
import uuid
from datetime import datetime
from typing import Any, cast

import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Cipher, Mapper, StoredEvent, Transcoder
from eventsourcing.utils import Environment, TopicError, resolve_topic

from stepsource.adapters.ports import NewEvent, RecordedEvent
from stepsource.aggregates.events import ExecutionEvent
from stepsource.errors import UnknownEventError, UsageError

__all__ = ["EventCodec", "OrjsonTranscoder", "make_cipher"]


class OrjsonTranscoder(Transcoder):
    """Strict JSON via orjson (datetimes and UUIDs encode natively; NaN is refused)."""

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def decode(self, data: bytes) -> Any:
        return orjson.loads(data)


def make_cipher(cipher_key: str) -> Cipher:
    """The eventsourcing AES-GCM cipher for a base64 key from ``stepsource keygen``."""
    try:
        from eventsourcing.cipher import AESCipher
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UsageError(
            "payload encryption needs pycryptodome",
            hint="pip install 'stepsource[crypto]'",
        ) from exc
    try:
        return AESCipher(Environment(env={AESCipher.CIPHER_KEY: cipher_key}))
    except (ValueError, OSError) as exc:
        raise UsageError(
            f"the cipher key is not valid: {exc}",
            hint="Use a key made by `stepsource keygen` (base64 of 16, 24 or 32 bytes)",
        ) from None


@functools.cache
def _converters(cls: type[Any]) -> tuple[tuple[str, Any], ...]:
    """Fields of an event class that JSON cannot carry natively, with their decoders."""
    out: list[tuple[str, Any]] = []
    for name, hint in typing.get_type_hints(cls).items():
        args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        if datetime in args:
            out.append((name, datetime.fromisoformat))
        elif uuid.UUID in args:
            out.append((name, uuid.UUID))
    return tuple(out)


class _TypedMapper(Mapper[uuid.UUID]):
    """The library Mapper, plus typed fields (timestamps) restored after JSON decoding."""

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[uuid.UUID]:
        event = super().to_domain_event(stored_event)
        state = event.__dict__
        for name, convert in _converters(type(event)):
            value = state.get(name)
            if isinstance(value, str):
                state[name] = convert(value)
        return event


class EventCodec:
    """Encodes pending aggregate events to :class:`NewEvent` and decodes recorded ones."""

    def __init__(self, cipher: Cipher | None = None) -> None:
        self.encrypted = cipher is not None
        self.cipher = cipher
        self._mapper = _TypedMapper(transcoder=OrjsonTranscoder(), cipher=cipher)

    def seal(self, data: bytes) -> bytes:
        """Encrypt bytes kept beside the log (inbox payloads, global state), if encrypting."""
        return self.cipher.encrypt(data) if self.cipher is not None else data

    def open(self, data: bytes) -> bytes:
        """The plaintext of :meth:`seal`ed bytes."""
        if self.cipher is None:
            return data
        try:
            return self.cipher.decrypt(data)
        except ValueError as exc:
            raise UnknownEventError(
                f"stored data cannot be decrypted: {exc}",
                hint="It was written with another cipher key, or without one",
            ) from None

    def encode(self, event: ExecutionEvent) -> NewEvent:
        stored = self._mapper.to_stored_event(event)
        return NewEvent(
            stream_id=str(stored.originator_id),
            version=stored.originator_version,
            topic=stored.topic,
            data=stored.state,
        )

    def decode(self, record: RecordedEvent) -> ExecutionEvent:
        stored = StoredEvent(
            originator_id=uuid.UUID(record.stream_id),
            originator_version=record.version,
            topic=record.topic,
            state=record.data,
        )
        try:
            resolve_topic(record.topic)
        except TopicError:
            raise UnknownEventError(
                f"event {record.version} has topic {record.topic!r}, which this version of "
                "stepsource does not know",
                execution_id=record.stream_id,
                hint="It was probably written by a newer stepsource: upgrade this process",
            ) from None
        try:
            event = self._mapper.to_domain_event(stored)
        except (ValueError, TypeError, KeyError) as exc:  # decoding, decrypting, upcasting
            hint = (
                "The log is encrypted: pass the same cipher_key (or set STEPSOURCE_CIPHER_KEY)"
                if not self.encrypted and not record.data.startswith(b"{")
                else "The data is damaged or was written with another cipher key"
            )
            raise UnknownEventError(
                f"event {record.version} ({record.topic}) cannot be decoded: {exc}",
                execution_id=record.stream_id,
                hint=hint,
            ) from None
        return cast(ExecutionEvent, event)
