"""The write path's lean encoding against the library path it replaces.

A command serialises its event once as it records it (``aggregates/encoding.py``): the
payload limit is checked on those bytes and the codec writes them as they are. Here the
bytes of events recorded by every recording command, with any JSON value, are compared with
what eventsourcing's Mapper stores for the same events; the records written from them equal
those encoded from the events alone; and the limit is checked on the stored size, refusing
before anything is recorded. (``tests/test_codec_lean.py`` compares ``stored_body``, through
``encode_many``, with the Mapper for every event type.) The one walk that checks and copies
a value gives what the reference walk gives, or the same refusal.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.persistence import Mapper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.secrets import Secret
from stepsource.aggregates.values import Limits, to_json, to_json_reference
from stepsource.engine.codec import EventCodec, OrjsonTranscoder
from stepsource.errors import LimitExceededError, StepsourceError
from stepsource.testing.strategies import json_objects, json_values, state_keys

MAPPER: Mapper[uuid.UUID] = Mapper(transcoder=OrjsonTranscoder())
NOW = datetime(2026, 1, 1, tzinfo=UTC)
OP = (1, "", 0, "1")


def running(limits: Limits | None = None) -> StepExecution:
    aggregate = StepExecution.schedule(
        execution_id=uuid.uuid4(),
        timestamp=NOW,
        step_id="s",
        step_version="1",
        definition={},
        input={},
        config={},
    )
    aggregate.lease(timestamp=NOW, worker_id="w", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=NOW, worker_id="w", step_version="1")
    aggregate.collect_events()
    if limits is not None:
        aggregate.limits = limits
    return aggregate


_commands = st.one_of(
    st.tuples(st.just("set_state"), state_keys(), json_values(8)),
    st.tuples(st.just("update_state"), json_objects(6)),
    st.tuples(st.just("delete_state"), state_keys()),
    st.tuples(st.just("checkpoint"), json_values(4), json_values(4)),
    st.tuples(st.just("history"), st.sampled_from(["custom", "note"]), json_objects(4)),
    st.tuples(st.just("substep"), json_values(6)),
)


def run_command(aggregate: StepExecution, command: tuple[Any, ...], n: int) -> None:
    name, *args = command
    if name == "set_state":
        aggregate.set_state(args[0], args[1], timestamp=NOW, op=OP)
    elif name == "update_state":
        aggregate.update_state(args[0], timestamp=NOW, op=OP)
    elif name == "delete_state":
        aggregate.delete_state(args[0], timestamp=NOW, op=OP)
    elif name == "checkpoint":
        aggregate.create_checkpoint(
            f"c{n}",
            metadata=None,
            cursor=args[0],
            items_processed=n,
            accumulated_results=args[1],
            timestamp=NOW,
            op=OP,
        )
    elif name == "history":
        aggregate.add_history_entry(args[0], args[1], timestamp=NOW, op=OP)
    else:
        aggregate.record_substep(f"sub{n}", value=args[0], timestamp=NOW, op=OP)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(_commands, min_size=1, max_size=12))
def test_recorded_commands_are_written_as_the_events_alone_would_be(
    commands: list[tuple[Any, ...]],
) -> None:
    aggregate = running()
    for n, command in enumerate(commands):
        run_command(aggregate, command, n)
    size = aggregate.pending_bytes
    events, bodies = aggregate.collect_encoded()
    assert sorted(bodies) == [event.originator_version for event in events]
    for event in events:
        assert bodies[event.originator_version] == MAPPER.to_stored_event(event).state
    assert size == sum(len(body) for body in bodies.values())
    assert aggregate.pending_bodies is None, "collecting leaves no bodies behind"
    codec = EventCodec()
    stream = aggregate.execution_id
    assert codec.encode_many(events, stream, bodies) == codec.encode_many(events, stream)


def test_the_payload_limit_is_checked_on_the_stored_bytes_before_recording() -> None:
    probe = running()
    probe.set_state("k", "x" * 100, timestamp=NOW, op=OP)
    [event], bodies = probe.collect_encoded()
    stored = len(bodies[event.originator_version])
    assert stored > 100  # the body carries the event's coordinates besides the value

    fits = running(Limits(max_payload_bytes=stored))
    fits.set_state("k", "x" * 100, timestamp=NOW, op=OP)
    assert fits.state == {"k": "x" * 100}

    over = running(Limits(max_payload_bytes=stored - 1))
    version = over.version
    with pytest.raises(LimitExceededError, match=f"{stored} bytes"):
        over.set_state("k", "x" * 100, timestamp=NOW, op=OP)
    assert over.version == version
    assert over.state == {}
    assert over.pending_bytes == 0
    assert over.collect_encoded() == ([], {})


def test_events_recorded_without_a_command_are_encoded_from_the_event() -> None:
    aggregate = running()
    aggregate.lease(timestamp=NOW, worker_id="w2", executor="e", lease_expires_ms=1)
    aggregate.set_state("k", 1, timestamp=NOW, op=OP)
    events, bodies = aggregate.collect_encoded()
    assert [type(e) for e in events] == [ev.StepLeased, ev.StateSet]
    assert list(bodies) == [events[1].originator_version]  # the lease has no cached body
    codec = EventCodec()
    stream = aggregate.execution_id
    assert codec.encode_many(events, stream, bodies) == codec.encode_many(events, stream)


class Tag(str):
    """A str subclass: the reference walk keeps it, the plain walk leaves it to that walk."""


class Model(BaseModel):
    name: str
    size: int


_odd_scalars = st.one_of(
    st.floats(),  # NaN and the infinities included
    st.integers(-(2**70), 2**70),  # beyond 64 bits too
    st.text(max_size=4),  # unpaired surrogates included
    st.builds(Tag, st.text(max_size=3)),
    st.builds(Model, name=st.text(max_size=3), size=st.integers(0, 9)),
    st.sampled_from([b"x", {1, 2}, datetime(2026, 1, 1), Secret("s"), True, None]),
)
_odd_values = st.recursive(
    _odd_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
        | st.dictionaries(st.integers(0, 3), children, max_size=2)
    ),
    max_leaves=10,
)


def _outcome(walk: Any, value: Any, limits: Limits) -> Any:
    try:
        result = walk(value, what="v", execution_id="e", step_id="s", limits=limits)
    except StepsourceError as error:
        return type(error), str(error)
    return result, _types(result)


def _types(value: Any) -> Any:
    """The exact type of every part: equal values of other types would slip through ==."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=st.one_of(json_values(20), _odd_values),
    limits=st.builds(Limits, max_depth=st.integers(1, 6), max_key_length=st.integers(1, 6)),
)
def test_the_one_walk_of_a_value_equals_the_reference_walk(value: Any, limits: Limits) -> None:
    """Same copy (value and exact types) or the same refusal, worded alike, for any value:
    plain JSON, values to convert, values to refuse, values over the depth or key limits."""
    assert _outcome(to_json, value, limits) == _outcome(to_json_reference, value, limits)


def test_the_copy_shares_nothing_with_the_value() -> None:
    value: dict[str, Any] = {"a": [1, {"b": "c"}], "d": {}}
    copied = to_json(value, what="v")
    assert copied == value
    value["a"][1]["b"] = "changed"
    value["d"]["e"] = 1
    assert copied == {"a": [1, {"b": "c"}], "d": {}}
