"""The write path's lean encoding against the library path it replaces.

A command serialises its event once as it records it (``aggregates/encoding.py``): the
payload limit is checked on those bytes and the codec writes them as they are. Here the
bytes of events recorded by every recording command, with any JSON value, are compared with
what eventsourcing's Mapper stores for the same events; the records written from them equal
those encoded from the events alone; and the limit is checked on the stored size, refusing
before anything is recorded. (``tests/test_codec_lean.py`` compares ``stored_body``, through
``encode_many``, with the Mapper for every event type.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.persistence import Mapper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import Limits
from stepsource.engine.codec import EventCodec, OrjsonTranscoder
from stepsource.errors import LimitExceededError
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
