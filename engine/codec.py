"""Domain events <-> stored bytes: eventsourcing's Mapper with an orjson transcoder.

Stored data is JSON only (orjson); topics are the events' explicit stable topics; an event of
an older ``class_version`` is upcast by the Mapper. Payload encryption at rest is the
eventsourcing AES cipher, switched on by a key. Decoding problems become
:class:`~stepsource.errors.UnknownEventError` naming the stream, version and what to do.

Reading is on replay's hot path, so :meth:`EventCodec.decode_many` builds the usual event
straight from its JSON (the class and typed fields of each topic looked up once, the stream
id parsed once per stream) and hands anything else to the Mapper path, which stays the
reference: the same events, the same errors (``tests/test_codec_lean.py`` compares them).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
import uuid
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, cast

import orjson
from eventsourcing.domain import AggregateCreated, DomainEventProtocol
from eventsourcing.persistence import Cipher, Mapper, StoredEvent, Transcoder
from eventsourcing.utils import Environment, get_topic

from stepsource.adapters.ports import UNREADABLE_TOPIC, NewEvent, RecordedEvent
from stepsource.aggregates.encoding import stored_body
from stepsource.aggregates.events import EVENT_CLASSES, ExecutionEvent
from stepsource.engine.checksums import (
    HEAD,
    PREFIX,
    ChecksumMismatch,
    add_checksum,
    stream_crc,
    strip_checksum,
    verify_checksum,
)
from stepsource.errors import CorruptLogError, UnknownEventError, UsageError
from stepsource.projections.folds import Passed

__all__ = ["STORED_HEAD", "EventCodec", "OrjsonTranscoder", "make_cipher", "stored_time_of"]


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


_Kind = tuple[type[ExecutionEvent], int, bool, tuple[tuple[str, Any], ...], bytes, bool]
"""How the records of one topic decode: the event class, its class_version, whether it has
the usual ``timestamp`` field, the decoders of its other typed fields, the topic's bytes
(for the checksum), and whether folding it only advances the version and time (its class
keeps the library's ``apply``, which does nothing)."""

_REFERENCE: _Kind = (ExecutionEvent, 0, False, (), b"", False)
"""The kind of a topic whose records always take the Mapper path."""

_KINDS: dict[str, _Kind] = {}


_PREFIX_LEN = len(PREFIX)
_CLASS_VERSION = b'"class_version":'

#: the head of an event stored the usual way: its checksum (group 1, the digits right after
#: :data:`~stepsource.engine.checksums.PREFIX`), then its time (group 2, the characters of
#: the ``timestamp`` string, which must end before 40); the checksum covers everything after
#: the comma that follows its digits (:data:`~stepsource.engine.checksums.HEAD`). One match
#: reads both, where the light paths (a fold that passes events, the index) need nothing else.
STORED_HEAD = re.compile(rb'\{"_c":(\d{1,11}),"timestamp":"([^"]{0,39})"[,}]')


class _Unusual(Exception):
    """A record the lean decoder leaves to the Mapper path."""


def _kind_of(topic: str) -> _Kind:
    """The kind of ``topic``, remembered once resolved (unknown topics are not)."""
    cls = EVENT_CLASSES.get(topic)  # never an import: only registered classes
    if cls is None:
        return _REFERENCE  # the Mapper path words the error
    kind = _REFERENCE
    if isinstance(cls, type) and issubclass(cls, ExecutionEvent):
        try:
            converters = _converters(cls)
        except Exception:  # noqa: BLE001 - unusual annotations: the Mapper path decides
            converters = None
        if converters is not None:
            timestamped = ("timestamp", datetime.fromisoformat) in converters
            others = tuple(
                (name, convert)
                for name, convert in converters
                # the id is set from the record; the usual timestamp has its own line
                if name != "originator_id" and not (timestamped and name == "timestamp")
            )
            passing = cls.apply is ExecutionEvent.apply and not issubclass(cls, AggregateCreated)
            version = getattr(cls, "class_version", 1)
            kind = (cls, version, timestamped, others, topic.encode(), passing)
    _KINDS[topic] = kind
    return kind


@functools.cache
def _fields(cls: type[Any]) -> frozenset[str]:
    """The stored fields of an event class (all but its id and version)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"originator_id", "originator_version"}
    if getattr(cls, "class_version", 1) > 1:
        names.add("class_version")
    return frozenset(names)


#: per event class: its topic, for encoding
_OUT: dict[type[Any], str] = {}


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
        # the codec decrypts and checks the checksum itself: the Mapper gets plain JSON
        self._mapper = _TypedMapper(transcoder=OrjsonTranscoder())

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
        return self.encode_many((event,), str(event.originator_id))[0]

    def encode_many(
        self,
        events: Iterable[ExecutionEvent],
        stream_id: str,
        bodies: Mapping[int, bytes] | None = None,
    ) -> list[NewEvent]:
        """The stored form of events of the stream ``stream_id``: the bytes the library's
        Mapper writes (the event's attributes but its id and version, ``class_version`` when
        above 1, encrypted if a cipher is set), without its per-event StoredEvent and topic
        lookup. ``bodies``: the JSON of events already serialised when they were recorded
        (:func:`~stepsource.aggregates.encoding.stored_body`, by version), written as is."""
        cipher = self.cipher
        out: list[NewEvent] = []
        known = bodies or {}
        start_crc = stream_crc(stream_id)
        make_new = NewEvent._make
        for event in events:
            cls = type(event)
            topic = _OUT.get(cls)
            if topic is None:
                topic = _OUT[cls] = get_topic(cls)
            version = event.originator_version
            body = known.get(version)
            if body is None:
                body = stored_body(event)
            data = add_checksum(stream_id, version, topic, body, start_crc)
            out.append(
                make_new((stream_id, version, topic, cipher.encrypt(data) if cipher else data))
            )
        return out

    def decode(self, record: RecordedEvent) -> ExecutionEvent:
        """The domain event of one stored record."""
        return self.decode_many((record,))[0]

    def fold_many(self, records: Iterable[RecordedEvent]) -> list[ExecutionEvent | Passed]:
        """:meth:`decode_many` for a fold that keeps only the aggregate: the usual stored
        events whose ``apply`` does nothing (most of a long log: history entries, recorded
        values) come as :class:`Passed` (their checksum verified, their time read from the
        bytes), and everything else as :meth:`decode_many` gives it. Replaying either list
        gives the same aggregate, or the same error."""
        return self._decode_records(records, passing=True)

    def decode_many(self, records: Iterable[RecordedEvent]) -> list[ExecutionEvent]:
        """The domain events of stored records, in order (of any streams; a read of one
        stream parses its id once).

        Each event is built straight from its JSON: the same object the Mapper makes, without
        the round trip through a StoredEvent. Anything out of the ordinary (an event to
        upcast, a topic that is not an execution event, data that does not decode) takes the
        Mapper path of :meth:`decode_reference`, so results and errors are the Mapper's.
        """
        return cast(list[ExecutionEvent], self._decode_records(records, passing=False))

    def _decode_records(
        self, records: Iterable[RecordedEvent], *, passing: bool
    ) -> list[ExecutionEvent | Passed]:
        out: list[ExecutionEvent | Passed] = []
        append = out.append
        kinds = _KINDS
        loads = orjson.loads
        new = object.__new__
        set_attr = object.__setattr__
        fromisoformat = datetime.fromisoformat
        plaintext = self.plaintext
        cipher = self.cipher
        stream: str | None = None
        originator_id: uuid.UUID | None = None
        checked = False
        start_crc = 0
        crc32 = zlib.crc32
        stored_stamp = stored_stamp_of
        # the run of passed events last appended, its stream, and its last event's stamp
        # and record: a run's time is its last event's, parsed once it ends (:meth:`_timed`)
        run: Passed | None = None
        run_stream: str | None = None
        run_stamp = b""
        run_record: RecordedEvent | None = None
        ended: list[tuple[Passed, bytes, RecordedEvent]] = []
        for record in records:
            if record.stream_id != stream:
                originator_id = _stream_uuid(record)
                stream = record.stream_id
                start_crc = stream_crc(stream)
                checked = False
            kind = kinds.get(record.topic)
            if kind is None:
                kind = _kind_of(record.topic)
            if kind is _REFERENCE:
                append(self.decode_reference(record, checked=checked))
                checked = checked or plaintext(record)[1]
                continue
            data = record.data
            version = record.version
            if passing and kind[5] and cipher is None and type(data) is bytes:
                stamp = stored_stamp(data, version, kind[4], start_crc)
                # a stored class_version (even in a value) takes the whole decode: a newer
                # version is refused there
                if stamp is not None and _CLASS_VERSION not in data:
                    checked = True
                    if (
                        run is not None
                        and out[-1] is run
                        and run.originator_version == version - 1
                        and run_stream is stream
                    ):
                        run.extend(version, kind[0].PROGRESS)  # one run: one fold
                    else:
                        if run is not None and run_record is not None:
                            ended.append((run, run_stamp, run_record))
                        run = Passed(version, kind[0].PROGRESS)
                        append(run)
                        run_stream = stream
                    run_stamp, run_record = stamp, record
                    continue
            state = None
            if cipher is None and type(data) is bytes and data.startswith(PREFIX):
                # the usual event: parsed whole, then its checksum checked in place against
                # the parsed ``_c`` (the digits right after the prefix, then a comma)
                try:
                    state = loads(data)
                    stored = state.pop("_c")
                    comma = _PREFIX_LEN + len(b"%d" % stored) if type(stored) is int else 0
                except Exception:  # noqa: BLE001 - the rare shapes: the general check below
                    comma = 0
                if (
                    comma == 0
                    or data[comma : comma + 1] != b","
                    or stored
                    != crc32(
                        data[comma + 1 :],
                        crc32(b"%d\x00%s\x00{" % (version, kind[4]), start_crc),
                    )
                ):
                    try:
                        verify_checksum(stream, version, record.topic, data, start_crc)
                    except ChecksumMismatch:
                        plaintext(record)  # raises, worded
                    state = None  # verified another way: parsed again below
                has_checksum = True
            else:
                data, has_checksum = plaintext(record, checked=checked)
            checked = checked or has_checksum
            cls, class_version, timestamped, others, _, _ = kind
            try:
                if state is None:
                    state = loads(data)
                    if type(state) is not dict:
                        raise _Unusual
                    state.pop("_c", None)
                if not has_checksum and state.keys() != _fields(cls):
                    raise _Unusual  # unchecked (older, or hand-written): the Mapper checks
                if "class_version" in state:
                    stored_version = state.pop("class_version")
                    if type(stored_version) is int and stored_version > class_version:
                        raise _newer(record, stored_version, class_version)
                    if stored_version != class_version:
                        raise _Unusual  # to upcast
                elif class_version > 1:
                    raise _Unusual  # to upcast from version 1
                state["originator_id"] = originator_id
                state["originator_version"] = version
                if timestamped:
                    value = state["timestamp"]
                    if type(value) is str:  # JSON strings are exactly str
                        state["timestamp"] = fromisoformat(value)
                if others:
                    for name, convert in others:
                        value = state.get(name)
                        if type(value) is str:
                            state[name] = convert(value)
            except UnknownEventError:
                raise
            except Exception:  # noqa: BLE001 - the Mapper path decides (and words the error)
                append(self.decode_reference(record, checked=checked))
                continue
            event = new(cls)
            set_attr(event, "__dict__", state)
            append(event)
        if run is not None and run_record is not None:
            ended.append((run, run_stamp, run_record))
        for passed, stamp, last in ended:
            passed.timestamp = self._timed(stamp, last)
        return out

    def _timed(self, stamp: bytes, record: RecordedEvent) -> datetime:
        """The time of a passed run: its last event's ``stamp`` (checksummed as stored),
        parsed; a stamp that is no time is decoded the general way, which words the error."""
        try:
            return datetime.fromisoformat(stamp.decode("ascii"))
        except ValueError:
            return self.decode_reference(record, checked=True).timestamp

    def stored_time(self, record: RecordedEvent, start_crc: int) -> datetime | None:
        """The ``timestamp`` of an event stored the usual way (unencrypted, its checksum
        first, then its time), its checksum verified, read from the bytes without parsing
        the rest of the JSON; None for any other record (then use :meth:`stored_state`).
        ``start_crc`` is :func:`~stepsource.engine.checksums.stream_crc` of its stream.
        Equal to ``datetime.fromisoformat(stored_state(record)["timestamp"])`` where it
        answers (``tests/test_codec_lean.py``)."""
        data = record.data
        if self.cipher is not None or type(data) is not bytes:
            return None
        return stored_time_of(data, record.version, record.topic.encode(), start_crc)

    def stored_state(self, record: RecordedEvent) -> Any:
        """The record's stored JSON, parsed, its checksum verified and dropped (for readers
        of a field or two, such as the index's light path). A record without a checksum
        must hold exactly its class's fields: :class:`UnknownEventError` otherwise."""
        data = record.data
        if self.cipher is None and type(data) is bytes and data.startswith(PREFIX):
            try:  # checked in place, parsed whole (its _c member is left: readers ignore it)
                verify_checksum(record.stream_id, record.version, record.topic, data)
            except ChecksumMismatch:
                self.plaintext(record)  # raises, worded
            return orjson.loads(data)
        data, checked = self.plaintext(record)
        state = orjson.loads(data)
        if not checked:
            cls = EVENT_CLASSES.get(record.topic)
            if cls is None or not isinstance(state, dict) or state.keys() != _fields(cls):
                self.decode_reference(record)  # raises, worded (or upcasts an older version)
        return state

    def plaintext(self, record: RecordedEvent, *, checked: bool = False) -> tuple[bytes, bool]:
        """The record's JSON, decrypted and its checksum verified and removed, and whether it
        had a checksum. ``checked``: an earlier event of the stream had one, so this one must.
        """
        data = record.data
        if type(data) is not bytes:  # a row written by hand (SQLite TEXT, not a BLOB)
            raise CorruptLogError(
                f"event {record.version} ({record.topic}) is stored as "
                f"{type(data).__name__}, not bytes: the row was written by hand or damaged",
                execution_id=record.stream_id,
                hint="Restore the store from a backup; `stepsource check` lists the damage",
            )
        if self.cipher is not None:
            try:
                data = self.cipher.decrypt(data)
            except (ValueError, TypeError, KeyError) as exc:
                raise UnknownEventError(
                    f"event {record.version} ({record.topic}) cannot be decoded: decryption: {exc}",
                    execution_id=record.stream_id,
                    hint="The data is damaged or was written with another cipher key",
                ) from None
        if not data.startswith(PREFIX):
            if checked:
                raise CorruptLogError(
                    f"event {record.version} ({record.topic}) has no checksum, though the "
                    "events before it have one: it was damaged or written by hand",
                    execution_id=record.stream_id,
                    hint="Restore the store from a backup; `stepsource check` lists the damage",
                )
            return data, False
        try:
            return strip_checksum(record.stream_id, record.version, record.topic, data)
        except ChecksumMismatch as exc:
            raise CorruptLogError(
                f"event {record.version} ({record.topic}) is damaged: {exc}",
                execution_id=record.stream_id,
                hint="Restore the store from a backup; `stepsource check` lists the damage",
            ) from None

    def decode_reference(self, record: RecordedEvent, *, checked: bool = False) -> ExecutionEvent:
        """:meth:`decode` through eventsourcing's Mapper (upcasting included)."""
        if record.topic == UNREADABLE_TOPIC:  # the backend could not read it as a commit
            raise CorruptLogError(
                f"a stored record at version {record.version or 'unknown'} is not stepsource's:"
                f" {bytes(record.data).decode('utf-8', 'replace')}",
                execution_id=record.stream_id,
                hint="Something else wrote into the log: remove it or restore the store, then "
                "`stepsource quarantine release ID`",
            )
        originator_id = _stream_uuid(record)
        cls = EVENT_CLASSES.get(record.topic)
        if cls is None:  # a stored string never imports a module
            raise UnknownEventError(
                f"event {record.version} has topic {record.topic!r}, which this version of "
                "stepsource does not know",
                execution_id=record.stream_id,
                hint="It was probably written by a newer stepsource: upgrade this process",
            )
        data, _ = self.plaintext(record, checked=checked)
        try:
            state = orjson.loads(data)
            stored_version = state.get("class_version", 1) if isinstance(state, dict) else 1
            known = getattr(cls, "class_version", 1)
            if isinstance(stored_version, int) and stored_version > known:
                raise _newer(record, stored_version, known)
            stored = StoredEvent(
                originator_id=originator_id,
                originator_version=record.version,
                topic=record.topic,
                state=data,
            )
            event = self._mapper.to_domain_event(stored)
            missing = _fields(cls) - {"class_version"} - event.__dict__.keys()
            if missing:
                raise KeyError(f"fields missing: {', '.join(sorted(missing))}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # decoding, upcasting
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


def stored_time_of(data: bytes, version: int, topic: bytes, start_crc: int) -> datetime | None:
    """:meth:`EventCodec.stored_time` of plaintext ``data`` (the event's topic as bytes), for
    readers that loop over many records of a plaintext log themselves."""
    stamp = stored_stamp_of(data, version, topic, start_crc)
    if stamp is None:
        return None
    try:
        return datetime.fromisoformat(stamp.decode("ascii"))
    except ValueError:
        return None


def stored_stamp_of(data: bytes, version: int, topic: bytes, start_crc: int) -> bytes | None:
    """The characters of the ``timestamp`` of plaintext ``data`` stored the usual way, its
    checksum verified, not yet parsed (a run of passed events parses only its last one);
    None for any other record (the general path words the damage)."""
    head = STORED_HEAD.match(data)
    if head is None:
        return None
    digits, stamp = head.groups()
    if zlib.crc32(
        data[len(digits) + _PREFIX_LEN + 1 :], zlib.crc32(HEAD % (version, topic), start_crc)
    ) != int(digits):
        return None
    return stamp


def _stream_uuid(record: RecordedEvent) -> uuid.UUID:
    try:
        return _uuid_of(record.stream_id)
    except (ValueError, TypeError, AttributeError):
        raise CorruptLogError(
            f"event {record.version} belongs to stream {record.stream_id!r}, which is not an "
            "execution id (a UUID): the row was written by hand or damaged",
            execution_id=str(record.stream_id)[:80],
            hint="Remove the row; `stepsource check` lists the damage",
        ) from None


@functools.lru_cache(maxsize=1024)
def _uuid_of(stream_id: str) -> uuid.UUID:
    """A stream id's UUID (immutable, so shared): reading a page of the log decodes a few
    events of each execution, one call each (the index's), and parsing the id cost more
    than looking it up."""
    return uuid.UUID(stream_id)


def _newer(record: RecordedEvent, stored: int, known: int) -> UnknownEventError:
    return UnknownEventError(
        f"event {record.version} ({record.topic}) has class_version {stored}, newer than "
        f"the {known} this version of stepsource reads",
        execution_id=record.stream_id,
        hint="It was written by a newer stepsource: upgrade this process",
    )
