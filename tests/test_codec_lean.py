"""Replay's lean paths against the library paths they replace.

``EventCodec.decode_many`` builds events straight from their JSON; ``decode_reference`` is
the eventsourcing Mapper path. For every event type, with and without a cipher, and for
records that are damaged, of unknown topics or of older class versions, both give equal
events (same type, same ``__dict__`` in the same order) or the same error. The lean
``ExecutionEvent.mutate`` folds to the same aggregate as the library's ``mutate``.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import types
import typing
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from eventsourcing.domain import (
    AggregateCreated,
    CanMutateAggregate,
    OriginatorIDError,
    OriginatorVersionError,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.aggregates.encoding import build_event
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import copy_json
from stepsource.engine.checksums import add_checksum, stream_crc, strip_checksum
from stepsource.engine.codec import EventCodec, make_cipher
from stepsource.engine.store import ExecutionStore
from stepsource.errors import CorruptLogError, UnknownEventError
from stepsource.projections.folds import Passed, replay
from stepsource.testing.strategies import json_objects, json_values

KEY = base64.b64encode(bytes(range(32))).decode()
CODECS = {"plain": EventCodec(), "encrypted": EventCodec(make_cipher(KEY))}
EVENT_CLASSES: tuple[type[ev.ExecutionEvent], ...] = (
    ev.ExecutionEvent,
    ev.Recorded,
    ev.WaitEnded,
    ev.Message,
    *ev.ALL_EVENTS,
)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Versioned(ev.ExecutionEvent):
    """An event at class version 3, whose older versions upcast."""

    TOPIC = "tests.codec_lean:Versioned"
    class_version = 3
    note: str

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["note"] = "v2:" + str(state.pop("old", ""))

    @staticmethod
    def upcast_v2_v3(state: dict[str, Any]) -> None:
        state["note"] += "+v3"


ev.register_event_class(Versioned)

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_SCALARS: dict[object, st.SearchStrategy[Any]] = {
    str: _text,
    int: st.integers(-(2**63), 2**63 - 1),
    bool: st.booleans(),
    float: st.floats(allow_nan=False, allow_infinity=False),
    type(None): st.none(),
}
_timestamps = st.datetimes(
    timezones=st.none() | st.just(UTC) | st.just(timezone(timedelta(hours=-5, minutes=-30)))
)


def _values(hint: object) -> st.SearchStrategy[Any]:
    """Values of a field's type (the hints of JSON and JSONObject come evaluated a level)."""
    if typing.get_origin(hint) is dict:  # JSONObject
        return json_objects(6)
    if typing.get_origin(hint) is list:  # list[JSON]
        return st.lists(json_values(4), max_size=3)
    if isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        if str in args and any(typing.get_origin(arg) is dict for arg in args):  # JSON
            return json_values(6)
        return st.one_of([_values(arg) for arg in args])
    return _SCALARS[hint]


@functools.cache
def events_of(cls: type[ev.ExecutionEvent]) -> st.SearchStrategy[ev.ExecutionEvent]:
    hints = typing.get_type_hints(cls)
    fields = {
        field.name: _values(hints[field.name])
        for field in dataclasses.fields(cls)
        if field.name not in ("originator_id", "originator_version", "timestamp")
    }
    return st.builds(
        cls,
        originator_id=st.uuids(),
        originator_version=st.integers(1, 2**31),
        timestamp=_timestamps,
        **fields,
    )


def cancelled(stream: uuid.UUID, version: int) -> ev.ExecutionEvent:
    fields: dict[str, Any] = {"originator_version": version, "timestamp": NOW, "reason": "r"}
    return ev.StepCancelled(originator_id=stream, **fields)  # fields of the metaclass


def record_of(codec: EventCodec, event: ev.ExecutionEvent, position: int = 1) -> RecordedEvent:
    new = codec.encode(event)
    return RecordedEvent(new.stream_id, new.version, new.topic, new.data, position)


def outcome(decode: Callable[[], Sequence[ev.ExecutionEvent]]) -> Any:
    """What a decode gives, comparably: each event's type and state (in key order), or the
    error's type and message."""
    try:
        decoded = decode()
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return ("error", type(exc), str(exc))
    return [(type(event), list(vars(event).items())) for event in decoded]


def reference_decode(
    codec: EventCodec, records: Sequence[RecordedEvent]
) -> list[ev.ExecutionEvent]:
    """The Mapper path record after record; an event after a checksummed one of its stream
    must carry a checksum too."""
    out: list[ev.ExecutionEvent] = []
    stream, checked = "", False
    for record in records:
        if record.stream_id != stream:
            stream, checked = record.stream_id, False
        out.append(codec.decode_reference(record, checked=checked))
        checked = checked or codec.plaintext(record)[1]
    return out


def assert_same(codec: EventCodec, records: Sequence[RecordedEvent]) -> None:
    """decode_many of the records is what the Mapper path gives record after record."""
    lean = outcome(lambda: codec.decode_many(records))
    reference = outcome(lambda: reference_decode(codec, records))
    assert lean == reference
    if len(records) == 1:
        assert outcome(lambda: [codec.decode(records[0])]) == reference


@pytest.mark.parametrize("codec_name", list(CODECS))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lean_decoding_equals_the_mapper_for_every_event_type(
    codec_name: str, data: st.DataObject
) -> None:
    codec = CODECS[codec_name]
    for cls in EVENT_CLASSES:
        event = data.draw(events_of(cls), label=cls.__name__)
        record = record_of(codec, event)
        [decoded] = codec.decode_many([record])
        assert type(decoded) is cls
        assert vars(decoded) == vars(event)  # the round trip itself
        assert_same(codec, [record])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lean_encoding_writes_the_bytes_the_mapper_writes(data: st.DataObject) -> None:
    """Stored data is the format: encode_many must write exactly what the Mapper writes, after
    the checksum that leads it (unencrypted; AES-GCM output differs per call, so the
    encrypted form is checked by decrypting it)."""
    plain, encrypted = CODECS["plain"], CODECS["encrypted"]
    for cls in EVENT_CLASSES:
        event = data.draw(events_of(cls), label=cls.__name__)
        stream = str(event.originator_id)
        stored = plain._mapper.to_stored_event(event)
        [new] = plain.encode_many([event], stream)
        body, checked = strip_checksum(new.stream_id, new.version, new.topic, new.data)
        assert checked
        assert (new.stream_id, new.version, new.topic, body) == (
            str(stored.originator_id),
            stored.originator_version,
            stored.topic,
            stored.state,
        )
        [sealed] = encrypted.encode_many([event], stream)
        opened = encrypted.open(sealed.data)
        assert strip_checksum(stream, new.version, new.topic, opened) == (stored.state, True)


@st.composite
def streams(draw: st.DrawFn) -> list[ev.ExecutionEvent]:
    """Events of one or two streams, numbered in each stream from 1."""
    ids = draw(st.lists(st.uuids(), min_size=1, max_size=2, unique=True))
    classes = draw(st.lists(st.sampled_from(ev.ALL_EVENTS), min_size=1, max_size=8))
    out: list[ev.ExecutionEvent] = []
    versions = dict.fromkeys(ids, 0)
    for cls in classes:
        stream = draw(st.sampled_from(ids))
        versions[stream] += 1
        event = draw(events_of(cls))
        vars(event).update(originator_id=stream, originator_version=versions[stream])
        out.append(event)
    return out


_DAMAGED = [
    b"",
    b"not json",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"7",
    b"{}",
    b'{"timestamp": "not a time"}',
    b'{"timestamp": 5, "attempt": 1}',
    b'{"timestamp": "2026-01-01T00:00:00+00:00", "class_version": "x"}',
    b'{"timestamp": "2026-01-01T00:00:00+00:00", "class_version": 0}',
    b'{"timestamp": "2026-01-01T00:00:00+00:00", "class_version": 9}',
    b'{"timestamp": "2026-01-01T00:00:00+00:00", "originator_id": "x", "originator_version": 0}',
]
_TOPICS = ["stepsource:NoSuchEvent", "nowhere.at.all:Thing", "builtins:dict", Versioned.TOPIC]


@st.composite
def damage(draw: st.DrawFn, record: RecordedEvent, codec: EventCodec) -> RecordedEvent:
    """The record, or the record with its data or topic spoiled."""
    how = draw(st.sampled_from(["none", "data", "topic", "flip"]))
    if how == "data":
        data = draw(st.sampled_from(_DAMAGED))
        if draw(st.booleans()):
            data = codec.seal(data)
        return record._replace(data=data)
    if how == "topic":
        return record._replace(topic=draw(st.sampled_from(_TOPICS)))
    if how == "flip" and record.data:
        at = draw(st.integers(0, len(record.data) - 1))
        flipped = bytes([record.data[at] ^ draw(st.integers(1, 255))])
        return record._replace(data=record.data[:at] + flipped + record.data[at + 1 :])
    return record


@pytest.mark.parametrize("codec_name", list(CODECS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_batch_decodes_as_the_mapper_decodes_record_by_record(
    codec_name: str, data: st.DataObject
) -> None:
    codec = CODECS[codec_name]
    records = [record_of(codec, event, n) for n, event in enumerate(data.draw(streams()), 1)]
    assert_same(codec, records)
    spoiled = [data.draw(damage(record, codec)) for record in records]
    assert_same(codec, spoiled)
    for record in spoiled:
        assert_same(codec, [record])


@pytest.mark.parametrize("codec_name", list(CODECS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_time_read_from_the_bytes_is_the_time_of_the_parsed_json(
    codec_name: str, data: st.DataObject
) -> None:
    """The index's light path reads an event's time from its bytes (stored_time); where it
    answers, the record is intact and the time is the one the whole parse gives; an intact
    unencrypted record always gets an answer (the light path is the usual one)."""
    codec = CODECS[codec_name]
    for n, event in enumerate(data.draw(streams()), 1):
        record = record_of(codec, event, n)
        spoiled = data.draw(damage(record, codec))
        for each in (record, spoiled):
            moment = codec.stored_time(each, stream_crc(each.stream_id))
            if moment is not None:
                assert moment == datetime.fromisoformat(codec.stored_state(each)["timestamp"])
                assert codec.decode(each).timestamp == moment
        if codec_name == "plain":
            assert codec.stored_time(record, stream_crc(record.stream_id)) == event.timestamp


def _passes(cls: type[ev.ExecutionEvent]) -> bool:
    """Whether folding an event of the class only advances the version and time."""
    return cls.apply is ev.ExecutionEvent.apply and not issubclass(cls, AggregateCreated)


def _as_folded(item: ev.ExecutionEvent) -> Any:
    return (type(item), list(vars(item).items()))


@pytest.mark.parametrize("codec_name", list(CODECS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_fold_read_passes_only_events_whose_fold_is_their_version_and_time(
    codec_name: str, data: st.DataObject
) -> None:
    """fold_many gives what decode_many gives (or its error), except that events whose
    ``apply`` does nothing may come as Passed with their version, time and progress flag;
    intact unencrypted ones always do (the lean path is the usual one)."""
    codec = CODECS[codec_name]
    records = [record_of(codec, event, n) for n, event in enumerate(data.draw(streams()), 1)]
    for batch in (records, [data.draw(damage(record, codec)) for record in records]):
        reference = outcome(functools.partial(codec.decode_many, batch))
        if reference[0] == "error":
            try:
                codec.fold_many(batch)
            except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
                assert ("error", type(exc), str(exc)) == reference  # noqa: PT017
            else:
                pytest.fail(f"fold_many did not raise {reference}")
            continue
        decoded = codec.decode_many(batch)
        expanded: list[ev.ExecutionEvent | Passed] = []  # a run of n events: n times
        for item in codec.fold_many(batch):
            size = (
                item.originator_version - item.first_version + 1 if isinstance(item, Passed) else 1
            )
            expanded += [item] * size
        assert len(expanded) == len(decoded)
        for item, event in zip(expanded, decoded, strict=True):
            if isinstance(item, Passed):
                run = [
                    e for e in decoded if item in expanded and expanded[decoded.index(e)] is item
                ]
                assert _passes(type(event))
                assert [e.originator_version for e in run] == list(
                    range(item.first_version, item.originator_version + 1)
                )
                assert len({e.originator_id for e in run}) == 1  # one stream's run
                assert item.timestamp == run[-1].timestamp
                assert item.progress == any(e.PROGRESS for e in run)
            else:
                assert _as_folded(item) == _as_folded(event)
            if batch is records and codec_name == "plain":
                assert isinstance(item, Passed) == _passes(type(event))


def test_folding_passed_events_builds_the_aggregate_the_events_build() -> None:
    _, events = _scenario()
    codec = CODECS["plain"]
    records = [record_of(codec, e, n) for n, e in enumerate(events, 1)]
    folded = codec.fold_many(records)
    assert any(isinstance(item, Passed) for item in folded)
    for cut in range(1, len(events) + 1):
        lean = replay(folded[:cut])
        assert lean is not None
        assert _comparable(lean) == _comparable(_library_fold(events[:cut]))
    passed = next(n for n, item in enumerate(folded) if isinstance(item, Passed))
    skipped = folded[: passed - 1] + folded[passed:]
    with pytest.raises(OriginatorVersionError):  # a version skipped is refused as before
        replay(skipped)


def test_errors_are_worded_as_the_mapper_path_words_them() -> None:
    codec, encrypted = CODECS["plain"], CODECS["encrypted"]
    event = cancelled(uuid.uuid4(), 2)
    record = record_of(codec, event)
    with pytest.raises(UnknownEventError, match="which this version of stepsource does not"):
        codec.decode_many([record._replace(topic="stepsource:Nope")])
    with pytest.raises(UnknownEventError, match="cannot be decoded") as plain_reading:
        codec.decode_many([record_of(encrypted, event)])
    assert plain_reading.value.hint is not None
    assert "The log is encrypted" in plain_reading.value.hint
    with pytest.raises(UnknownEventError, match="cannot be decoded"):
        encrypted.decode_many([record])
    other = EventCodec(make_cipher(base64.b64encode(b"k" * 32).decode()))
    with pytest.raises(UnknownEventError, match="cannot be decoded"):
        other.decode_many([record_of(encrypted, event)])
    for spoiled in (b"{", b"[]", b'{"timestamp": "when"}'):
        assert_same(codec, [record._replace(data=spoiled)])
    with pytest.raises(CorruptLogError, match="'not-a-uuid', which is not an execution id"):
        codec.decode_many([record._replace(stream_id="not-a-uuid")])


@pytest.mark.parametrize("codec_name", list(CODECS))
def test_older_class_versions_are_upcast_as_the_mapper_upcasts(codec_name: str) -> None:
    codec = CODECS[codec_name]
    stream = str(uuid.uuid4())
    stamp = NOW.isoformat()

    def stored(version: int, **state: Any) -> RecordedEvent:
        data = codec.seal(orjson.dumps({"timestamp": stamp, **state}))
        return RecordedEvent(stream, version, Versioned.TOPIC, data, version)

    records = [
        stored(1, old="a"),  # written before class versions: 1
        stored(2, note="b", class_version=2),
        stored(3, note="c", class_version=3),
    ]
    decoded = codec.decode_many(records)
    assert [e.note for e in decoded] == ["v2:a+v3", "b+v3", "c"]  # type: ignore[attr-defined]
    assert all("class_version" not in vars(e) for e in decoded)
    assert [e.timestamp for e in decoded] == [NOW] * 3
    assert_same(codec, records)
    newer = stored(4, note="d", class_version=4)  # written by a newer release: refused
    for decode in (codec.decode_many, lambda rs: [codec.decode_reference(r) for r in rs]):
        with pytest.raises(UnknownEventError, match=r"event 4 .* class_version 4, newer") as err:
            decode([*records, newer])
        assert err.value.execution_id == stream
    assert_same(codec, [*records, newer])


def test_store_decode_reports_the_first_problem_of_a_one_by_one_read() -> None:
    codec = CODECS["plain"]
    store = ExecutionStore(MemoryBackend(), codec)
    stream = uuid.uuid4()
    records = [record_of(codec, cancelled(stream, n)) for n in range(1, 6)]
    assert [e.originator_version for e in store.decode(records)] == [1, 2, 3, 4, 5]
    assert [e.originator_version for e in store.decode(records[2:], expect_from=3)] == [3, 4, 5]
    gap = records[:2] + records[3:]
    with pytest.raises(CorruptLogError, match="version 4 where version 3 was expected"):
        store.decode(gap)
    damaged = [records[0], records[1]._replace(data=b"{"), *records[3:]]
    with pytest.raises(CorruptLogError, match=r"event 2 .* has no checksum"):
        store.decode(damaged)  # the damaged record comes before the gap
    assert [e.originator_version for e in store.decode_all(records[::-1])] == [5, 4, 3, 2, 1]


# -- the fold ----------------------------------------------------------------------------------
def _library_fold(events: Sequence[ev.ExecutionEvent]) -> StepExecution:
    """The fold as the library's mutate does it (plus Recorded's reset of leases_lost)."""
    aggregate: StepExecution | None = None
    for event in events:
        if isinstance(event, AggregateCreated):
            aggregate = event.mutate(None)
            continue
        aggregate = CanMutateAggregate.mutate(event, aggregate)
        if isinstance(event, ev.Recorded):
            assert aggregate is not None
            aggregate.leases_lost = 0
    assert aggregate is not None
    return aggregate


def _scenario() -> tuple[StepExecution, list[ev.ExecutionEvent]]:
    aggregate = StepExecution.schedule(
        execution_id=uuid.uuid4(),
        timestamp=NOW,
        step_id="s",
        step_version="1",
        definition={"d": 1},
        input={"i": [1, 2]},
        config={},
    )
    op = (1, "", 0, "1")
    aggregate.lease(timestamp=NOW, worker_id="w0", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=NOW, worker_id="w0", step_version="1")
    for n in range(1, 4):  # workers lost in a row, until the set_state below
        at = NOW + timedelta(seconds=n)
        aggregate.lease(timestamp=at, worker_id=f"w{n}", executor="e", lease_expires_ms=n)
    assert aggregate.leases_lost == 3
    aggregate.set_state("k", {"v": [1]}, timestamp=NOW, op=op)
    aggregate.update_state({"a": 1, "b": None}, timestamp=NOW, op=op)
    aggregate.create_checkpoint(
        "c1",
        metadata={"m": 1},
        cursor=[1],
        items_processed=3,
        accumulated_results=None,
        timestamp=NOW,
        op=op,
    )
    aggregate.delete_state("k", timestamp=NOW, op=op)
    aggregate.restore_checkpoint("c1", timestamp=NOW, op=op)
    aggregate.add_history_entry("custom", {"x": 1}, timestamp=NOW, op=op)
    aggregate.record_substep("sub", value=[1, 2], timestamp=NOW, op=op)
    aggregate.suspend("sleep", 5, timestamp=NOW)
    aggregate.receive(ev.SignalReceived, inbox_id=7, name="go", timestamp=NOW, payload={"p": 1})
    aggregate.lease(timestamp=NOW, worker_id="w10", executor="e", lease_expires_ms=0)
    aggregate.fail_attempt(timestamp=NOW, error_type="E", error_message="m", retry_at_ms=9)
    aggregate.lease(timestamp=NOW, worker_id="w11", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=NOW, worker_id="w11", step_version="1")
    aggregate.complete({"out": True}, timestamp=NOW + timedelta(minutes=1), op=op)
    events = list(aggregate.collect_events())
    return aggregate, events


def _comparable(aggregate: StepExecution) -> dict[str, Any]:
    """The aggregate's state: not its buffer of pending events and their byte count, nor
    the id's string form (cached on first use)."""
    buffer = ("_pending_events", "pending_bytes", "execution_id")
    return {k: v for k, v in vars(aggregate).items() if k not in buffer}


def test_the_lean_mutate_folds_as_the_library_mutate() -> None:
    live, events = _scenario()
    codec = CODECS["plain"]
    decoded = codec.decode_many([record_of(codec, e, n) for n, e in enumerate(events, 1)])
    for log in (events, decoded):
        folded = replay(log)
        assert folded is not None
        assert _comparable(folded) == _comparable(_library_fold(log)) == _comparable(live)
        assert folded.version == len(events)
        assert folded.modified_on == events[-1].timestamp
    for cut in range(1, len(events) + 1):
        upto = replay(events, at_version=cut)
        assert upto is not None
        assert _comparable(upto) == _comparable(_library_fold(events[:cut]))


def test_the_lean_mutate_refuses_what_the_library_refuses() -> None:
    _, events = _scenario()
    aggregate = replay(events[:5])
    assert aggregate is not None
    before = _comparable(aggregate)
    with pytest.raises(OriginatorVersionError):
        events[6].mutate(aggregate)  # skips version 6
    with pytest.raises(OriginatorVersionError):
        events[3].mutate(aggregate)  # already applied
    stranger = dataclasses.replace(events[5], originator_id=uuid.uuid4())
    with pytest.raises(OriginatorIDError):
        stranger.mutate(aggregate)
    assert _comparable(aggregate) == before  # nothing applied
    same_id = dataclasses.replace(events[5], originator_id=uuid.UUID(str(aggregate.id)))
    assert same_id.mutate(aggregate) is aggregate  # an equal id, not the same object
    assert aggregate.version == 6


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_events_built_for_recording_equal_the_dataclass_constructor(data: st.DataObject) -> None:
    """The aggregate records events with ``build_event`` instead of their ``__init__``: the
    same fields in the same order (the stored JSON's key order) from values in any order."""
    for cls in EVENT_CLASSES:
        event = data.draw(events_of(cls), label=cls.__name__)
        items = list(vars(event).items())
        shuffled = dict(data.draw(st.permutations(items), label="order"))
        built = build_event(cls, shuffled)
        assert type(built) is cls
        assert list(vars(built).items()) == items
        assert shuffled == {}, "the values are consumed"
        missing = dict(items[1:])
        with pytest.raises(TypeError, match=items[0][0]):
            build_event(cls, missing)
        with pytest.raises(TypeError, match="surplus"):
            build_event(cls, {**dict(items), "surplus": 1})


def _containers(value: Any) -> list[int]:
    """The ids of every dict and list in a JSON value."""
    if isinstance(value, dict):
        return [id(value), *(i for v in value.values() for i in _containers(v))]
    if isinstance(value, list):
        return [id(value), *(i for v in value for i in _containers(v))]
    return []


@settings(max_examples=100, deadline=None)
@given(value=json_values())
def test_the_state_copy_a_fold_makes_equals_a_deep_copy(value: Any) -> None:
    """StateSet and StateUpdated copy their values with copy_json instead of deepcopy: an
    equal value sharing no dict or list with the event's."""
    copied = copy_json(value)
    assert copied == copy.deepcopy(value)
    assert not set(_containers(copied)) & set(_containers(value))


def _entry(stream: uuid.UUID, version: int, at: datetime) -> ev.ExecutionEvent:
    fields: dict[str, Any] = {
        "originator_version": version,
        "timestamp": at,
        "attempt": 1,
        "scope": "",
        "seq": version,
        "step_version": "1",
        "entry_type": "note",
        "details": {"n": version},
    }
    return ev.HistoryEntryAdded(originator_id=stream, **fields)  # fields of the metaclass


def test_a_run_of_passed_events_takes_its_last_events_time_or_its_error() -> None:
    """A run's time is parsed once, from its last event; a last stamp that is checksummed
    but no time fails the fold as the whole decode fails (the same error), not silently."""
    codec = CODECS["plain"]
    stream = uuid.uuid4()
    times = [NOW + timedelta(seconds=n) for n in range(4)]
    records = [record_of(codec, _entry(stream, n + 2, at), n + 2) for n, at in enumerate(times)]
    (run,) = codec.fold_many(records)
    assert isinstance(run, Passed)
    assert (run.first_version, run.originator_version, run.timestamp) == (2, 5, times[-1])
    assert_same(codec, records)
    last = records[-1]
    body, _ = strip_checksum(last.stream_id, last.version, last.topic, last.data)
    body = body.replace(times[-1].isoformat().encode(), b"2026-02-31T00:00:00+00:00")
    forged = last._replace(data=add_checksum(last.stream_id, last.version, last.topic, body))
    assert codec.stored_time(forged, stream_crc(forged.stream_id)) is None
    spoiled = [*records[:-1], forged]
    with pytest.raises(UnknownEventError, match=r"event 5 .* cannot be decoded") as whole:
        codec.decode_many(spoiled)
    with pytest.raises(UnknownEventError) as folded:
        codec.fold_many(spoiled)
    assert str(folded.value) == str(whole.value)
