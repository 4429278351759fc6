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

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import orjson

from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.engine.checksums import stream_crc
from stepsource.engine.codec import EventCodec
from stepsource.engine.store import has_checksum
from stepsource.errors import StepsourceError
from stepsource.projections.summaries import INDEXED_EVENTS, Touched, Unreadable

__all__ = ["IndexBatch", "index_batch", "read_page"]

_logger = logging.getLogger("stepsource.readmodels")

IndexBatch = list[tuple[int, ev.ExecutionEvent | Touched | Unreadable]]
"""(position, what the index folds) for each record of a page."""

_INDEXED_TOPICS = frozenset(cls.TOPIC for cls in INDEXED_EVENTS)


async def read_page(
    backend: Backend, codec: EventCodec, after: int, size: int, target: int
) -> tuple[list[RecordedEvent], IndexBatch]:
    """The records after position ``after`` (at most ``size``, none past ``target``) and
    what the index folds of them."""
    records = await backend.read_all(after, size)
    if records and records[-1].position > target:
        records = [r for r in records if r.position <= target]
    return records, index_batch(codec, records, await checked_before(backend, codec, records))


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
_PLAIN = EventCodec()


def _opened(codec: EventCodec, record: RecordedEvent) -> RecordedEvent:
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
    return dataclasses.replace(record, data=data)


def index_batch(
    codec: EventCodec,
    records: Sequence[RecordedEvent],
    checked: Mapping[str, bool] | None = None,
) -> IndexBatch:
    """The batch's events: decoded whole where the index reads their content; for the
    others (most of a log) only the time is read from the stored JSON, which is several
    times cheaper. An encrypted log's records are decrypted first, once each. ``checked``:
    the streams whose event before this batch carries a checksum (:func:`checked_before`),
    so theirs must too."""
    encrypted = codec.encrypted
    reader = _PLAIN if encrypted else codec
    out: IndexBatch = []
    said: set[str] = set()
    crcs: dict[str, int] = {}  # each stream's part of the checksum, once per batch
    gone_checked = dict(checked or {})  # stream -> an earlier event had a checksum
    for record in records:
        try:
            if encrypted:
                record = _opened(codec, record)  # read as a plaintext record from here
            stream = record.stream_id
            if has_checksum(reader, record, after_checked=gone_checked.get(stream, False)):
                gone_checked[stream] = True
            if record.topic not in _INDEXED_TOPICS:
                start_crc = crcs.get(record.stream_id)
                if start_crc is None:
                    start_crc = crcs[record.stream_id] = stream_crc(record.stream_id)
                moment = reader.stored_time(record, start_crc)
                if moment is not None:  # the usual record: checked, its time read
                    out.append((record.position, Touched(record.stream_id, record.version, moment)))
                    continue
                try:  # checksum and fields are checked here too: damage quarantines
                    moment = datetime.fromisoformat(reader.stored_state(record)["timestamp"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    pass  # damaged: the full decode below says what is wrong
                else:
                    out.append((record.position, Touched(record.stream_id, record.version, moment)))
                    continue
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
    return out
