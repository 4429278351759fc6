"""Reading the log for the executions index: pages of records turned into what it folds.

The index reads the content of a few event types only (:data:`INDEXED_EVENTS`); for the
others, most of a log, it needs the execution, the version and the time, which are read
from the stored bytes (the checksum verified) instead of decoding the event whole. An
encrypted log's records are decrypted once each and then read the same way. An event that
cannot be read becomes :class:`Unreadable`: its execution is quarantined in the index.

A stream never goes back from checksummed events to unchecksummed ones (see
:mod:`.checksums`): an event without a checksum after one with it is damage (or a forged
row). The light path checks that too, across pages: for a stream whose first event in a page
has no checksum, the event before it is read from the log (one read, only then: logs written
with checksums never need it), and within the page the stream's state is carried along.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.engine.checksums import HEAD, PREFIX, stream_crc
from stepsource.engine.codec import STORED_HEAD, EventCodec
from stepsource.engine.store import has_checksum
from stepsource.errors import StepsourceError
from stepsource.projections.summaries import INDEXED_EVENTS, Touched, Unreadable

__all__ = ["PLAIN", "IndexBatch", "Page", "index_batch", "opened", "page_of", "read_page"]

_logger = logging.getLogger("stepsource.readmodels")

IndexBatch = list[tuple[int, ev.ExecutionEvent | Touched | Unreadable]]
"""(position, what the index folds) for each record of a page."""

_INDEXED_TOPICS = frozenset(cls.TOPIC for cls in INDEXED_EVENTS)
#: where the JSON the checksum covers goes on, after the checksum's digits and the comma
_BODY_FROM = len(PREFIX) + 1
_NEVER = datetime(1970, 1, 1, tzinfo=UTC)  # a run's time before its first event


class Page(NamedTuple):
    """A page of the log as the index folds it: the position of its last record (0: none),
    how many events it holds, its first record's stream, and what the index folds of it."""

    end: int
    events: int
    first: str | None
    batch: IndexBatch


async def read_page(
    backend: Backend, codec: EventCodec, after: int, size: int, target: int
) -> Page:
    """The records after position ``after`` (at most ``size``, none past ``target``) as the
    index folds them."""
    records = await backend.read_all(after, size)
    if records and records[-1].position > target:
        records = [r for r in records if r.position <= target]
    return await page_of(backend, codec, records)


async def page_of(backend: Backend, codec: EventCodec, records: list[RecordedEvent]) -> Page:
    """:class:`Page` of records read in log order (``backend`` reads the event before a
    stream's first record here, when its checksum must be known: see :func:`index_batch`)."""
    if not records:
        return Page(0, 0, None, [])
    if codec.encrypted:
        batch = index_batch(codec, records, await checked_before(backend, codec, records))
    else:
        try:  # the streams before the page are read only for a record that needs it (rare)
            batch = index_batch(codec, records)
        except _NeedsChecked:
            batch = index_batch(codec, records, await checked_before(backend, codec, records))
    return Page(records[-1].position, len(records), records[0].stream_id, batch)


async def checked_before(
    backend: Backend, codec: EventCodec, records: Sequence[RecordedEvent]
) -> dict[str, bool]:
    """For each stream whose first record here has no checksum and is not its first event:
    whether the event before it (read from the log) has one."""
    firsts: dict[str, RecordedEvent] = {}
    for record in records:
        firsts.setdefault(record.stream_id, record)
    out: dict[str, bool] = {}
    for stream_id, record in firsts.items():
        try:
            if record.version <= 1 or has_checksum(codec, record, after_checked=False):
                continue
            previous = await backend.read_stream(stream_id, record.version - 1, record.version - 1)
            if previous:
                out[stream_id] = has_checksum(codec, previous[0], after_checked=False)
        except StepsourceError:
            continue  # unreadable or gone: the decode in index_batch says what is wrong
    return out


#: reads the records of an encrypted log once they are decrypted
PLAIN = EventCodec()


def opened(codec: EventCodec, record: RecordedEvent) -> RecordedEvent:
    """An encrypted log's record with its data decrypted, read from then on as a record of
    a plaintext log (decrypted once, not once per check)."""
    cipher = codec.cipher
    if cipher is None or type(record.data) is not bytes:
        return record
    try:
        data = cipher.decrypt(record.data)
    except (ValueError, TypeError, KeyError):
        codec.plaintext(record)  # raises, worded
        raise  # pragma: no cover - plaintext raised already
    return record._replace(data=data)


class _NeedsChecked(Exception):
    """A stream's first record in the page has no checksum and is not its first event:
    whether the event before it has one must be read first (:func:`checked_before`)."""


def index_batch(
    codec: EventCodec,
    records: Sequence[RecordedEvent],
    checked: Mapping[str, bool] | None = None,
    *,
    runs: bool = True,
) -> IndexBatch:
    """The batch's events: decoded whole where the index reads their content; for the
    others (most of a log) only the time is read from the stored JSON, which is several
    times cheaper, and a run of them that follow each other in the log (one execution's)
    comes as one :class:`Touched` (``runs=False``: one per event). An encrypted log's records
    are decrypted first, once each. ``checked``: the streams whose event before this batch
    carries a checksum (:func:`checked_before`), so theirs must too; None for a plaintext
    log: :class:`_NeedsChecked` if one of them must be read."""
    if codec.encrypted:
        return _general_batch(codec, records, checked or {})
    out: IndexBatch = []
    append = out.append
    said: set[str] = set()
    crcs: dict[str, int] = {}  # each stream's part of the checksum, once per batch
    gone_checked = dict(checked or {})  # stream -> an earlier event had a checksum
    topics: dict[str, bytes] = {}  # each light topic as bytes; indexed topics are absent
    match = STORED_HEAD.match
    crc32 = zlib.crc32
    fromisoformat = datetime.fromisoformat
    # the run of light events being gathered: its stream, last position, version and time,
    # and how many events it holds (0: none)
    run_stream = ""
    run_position = run_version = run_count = 0
    run_time = _NEVER
    for record in records:
        data = record.data
        topic = record.topic
        head = match(data) if type(data) is bytes else None
        if head is not None:
            topic_bytes = topics.get(topic)
            if topic_bytes is None and topic not in _INDEXED_TOPICS:
                topic_bytes = topics[topic] = topic.encode()
            if topic_bytes is not None:  # a light event: its checksum checked, its time read
                stream = record.stream_id
                version = record.version
                start_crc = crcs.get(stream)
                if start_crc is None:
                    start_crc = crcs[stream] = stream_crc(stream)
                digits, stamp = head.groups()
                if crc32(
                    data[len(digits) + _BODY_FROM :],
                    crc32(HEAD % (version, topic_bytes), start_crc),
                ) == int(digits):
                    try:
                        moment = fromisoformat(stamp.decode("ascii"))
                    except ValueError:
                        moment = None  # damaged: the general path says what is wrong
                    if moment is not None:
                        if run_count and stream == run_stream and runs:
                            run_count += 1
                        else:
                            if run_count:
                                append(
                                    (
                                        run_position,
                                        Touched(run_stream, run_version, run_time, run_count),
                                    )
                                )
                            run_stream, run_count = stream, 1
                            gone_checked[stream] = True
                        run_position, run_version, run_time = record.position, version, moment
                        continue
        if run_count:
            append((run_position, Touched(run_stream, run_version, run_time, run_count)))
            run_count = 0
        if checked is None and record.stream_id not in gone_checked and record.version > 1:
            try:
                needed = not has_checksum(codec, record, after_checked=False)
            except StepsourceError:
                needed = False  # unreadable anyway: the general path quarantines it
            if needed:
                raise _NeedsChecked
        _general_record(codec, codec, record, out, said, crcs, gone_checked)
    if run_count:
        append((run_position, Touched(run_stream, run_version, run_time, run_count)))
    return out


def _general_batch(
    codec: EventCodec, records: Sequence[RecordedEvent], checked: Mapping[str, bool]
) -> IndexBatch:
    """:func:`index_batch` record by record (an encrypted log's: each decrypted once)."""
    reader = PLAIN if codec.encrypted else codec
    out: IndexBatch = []
    said: set[str] = set()
    crcs: dict[str, int] = {}
    gone_checked = dict(checked)
    for record in records:
        _general_record(codec, reader, record, out, said, crcs, gone_checked)
    return out


def _general_record(
    codec: EventCodec,
    reader: EventCodec,
    record: RecordedEvent,
    out: IndexBatch,
    said: set[str],
    crcs: dict[str, int],
    gone_checked: dict[str, bool],
) -> None:
    """Append what the index folds of one record (``reader`` reads it once ``codec`` has
    decrypted it): a :class:`Touched` for a light event, the event decoded whole for an
    indexed one, an :class:`Unreadable` for one that cannot be read."""
    try:
        if codec.encrypted:
            record = opened(codec, record)  # read as a plaintext record from here
        stream = record.stream_id
        if has_checksum(reader, record, after_checked=gone_checked.get(stream, False)):
            gone_checked[stream] = True
        else:
            gone_checked.setdefault(stream, False)
        if record.topic not in _INDEXED_TOPICS:
            start_crc = crcs.get(record.stream_id)
            if start_crc is None:
                start_crc = crcs[record.stream_id] = stream_crc(record.stream_id)
            moment = reader.stored_time(record, start_crc)
            if moment is not None:  # the usual record: checked, its time read
                out.append((record.position, Touched(record.stream_id, record.version, moment)))
                return
            try:  # checksum and fields are checked here too: damage quarantines
                moment = datetime.fromisoformat(reader.stored_state(record)["timestamp"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # damaged: the full decode below says what is wrong
            else:
                out.append((record.position, Touched(record.stream_id, record.version, moment)))
                return
        out.append((record.position, reader.decode(record)))
    except StepsourceError as error:
        # an event this code cannot read: its execution is quarantined in the index
        # (the rest of the log is still folded), a status derived again on rebuild
        if record.stream_id not in said:  # once per execution and batch
            said.add(record.stream_id)
            _logger.warning(
                "execution %s is quarantined: %s", str(record.stream_id)[:80], error.reason
            )
        reason = error.reason
        out.append((record.position, Unreadable(str(record.stream_id), record.version, reason)))
