"""Reading the log for the executions index: pages of records turned into what it folds.

The index reads the content of a few event types only (:data:`INDEXED_EVENTS`); for the
others, most of a log, it needs the execution, the version and the time, which are read
from the stored bytes (the checksum verified) instead of decoding the event whole. An event
that cannot be read becomes :class:`Unreadable`: its execution is quarantined in the index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import orjson

from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.engine.checksums import stream_crc
from stepsource.engine.codec import EventCodec
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
    return records, index_batch(codec, records)


def index_batch(codec: EventCodec, records: Sequence[RecordedEvent]) -> IndexBatch:
    """The batch's events: decoded whole where the index reads their content; for the
    others (most of a log) only the time is read from the stored JSON, which is several
    times cheaper. An encrypted log is decoded whole."""
    light = not codec.encrypted
    out: IndexBatch = []
    said: set[str] = set()
    crcs: dict[str, int] = {}  # each stream's part of the checksum, once per batch
    for record in records:
        try:
            if light and record.topic not in _INDEXED_TOPICS:
                start_crc = crcs.get(record.stream_id)
                if start_crc is None:
                    start_crc = crcs[record.stream_id] = stream_crc(record.stream_id)
                moment = codec.stored_time(record, start_crc)
                if moment is not None:  # the usual record: checked, its time read
                    out.append((record.position, Touched(record.stream_id, record.version, moment)))
                    continue
                try:  # checksum and fields are checked here too: damage quarantines
                    moment = datetime.fromisoformat(codec.stored_state(record)["timestamp"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    pass  # damaged: the full decode below says what is wrong
                else:
                    out.append((record.position, Touched(record.stream_id, record.version, moment)))
                    continue
            out.append((record.position, codec.decode(record)))
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
