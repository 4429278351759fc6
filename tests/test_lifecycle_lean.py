"""An execution's creation on the lean path against the library path it replaces.

``StepExecution.schedule`` builds its ``StepScheduled`` with ``build_event`` and creates the
aggregate through ``StepScheduled.mutate`` (``aggregates/encoding.py``: ``create``), where the
library's ``_create`` constructs the event through its dataclass ``__init__`` and creates the
aggregate through ``CanInitAggregate.mutate``, which picks each init's arguments out of the
event on every call. Both must give the same aggregate, the same pending event (field by field
and in the same order, so the same stored bytes) and the same refusals; a replay creates the
aggregate through the same ``mutate``, so a stored event read back must fold to it too.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.domain import CanInitAggregate
from eventsourcing.utils import get_topic
from hypothesis import given, settings
from hypothesis import strategies as st

from stepsource.adapters.ports import RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.aggregates.encoding import stored_body
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import Limits
from stepsource.engine.codec import EventCodec
from stepsource.testing.strategies import json_objects

NOW = datetime(2026, 1, 1, tzinfo=UTC)
#: the library's creation of an aggregate from its creation event (typed loosely: the
#: library's signature is generic over the aggregate)
LIBRARY_MUTATE: Any = CanInitAggregate.mutate
SCHEDULED: Any = ev.StepScheduled

_texts = st.text(min_size=1, max_size=12)
_optional_texts = st.none() | _texts

_schedules = st.fixed_dictionaries(
    {
        "timestamp": st.integers(0, 10**9).map(lambda s: NOW + timedelta(microseconds=s)),
        "step_id": _texts,
        "step_version": _texts,
        "definition": json_objects(6),
        "input": json_objects(6),
        "config": json_objects(4),
        "flow_id": _optional_texts,
        "root_execution_id": _optional_texts,
        "parent_id": _optional_texts,
        "parent_execution_id": _optional_texts,
        "correlation_id": _optional_texts,
        "priority": st.integers(-1000, 1000),
        "optional": st.booleans(),
        "max_retries": st.integers(0, 50),
        "retry_policy": st.none() | json_objects(4),
        "due_ms": st.integers(0, 2**48),
    },
    optional={  # what schedule fills in itself when not given
        "dependencies": json_objects(4),
        "headers": st.dictionaries(_texts, _texts, max_size=4),
        "key": _optional_texts,
        "continues": st.none() | st.tuples(_texts, _texts, st.integers(1, 99)),
    },
)


def library_schedule(execution_id: uuid.UUID, args: dict[str, Any]) -> StepExecution:
    """What ``schedule`` made through the library: the event by its dataclass ``__init__``,
    the aggregate by ``CanInitAggregate.mutate`` (as ``_create`` does, with its checks)."""
    fields = dict(args)
    continues = fields.pop("continues", None)
    headers = fields.pop("headers", None)
    fields.setdefault("dependencies", {})
    event = SCHEDULED(
        originator_topic=get_topic(StepExecution),
        originator_id=execution_id,
        originator_version=StepExecution.INITIAL_VERSION,
        headers=dict(headers) if headers else None,
        continued_from=continues[0] if continues else None,
        chain_root=continues[1] if continues else None,
        chain_run=continues[2] if continues else 1,
        **fields,
    )
    aggregate = LIBRARY_MUTATE(event, None)
    assert isinstance(aggregate, StepExecution)
    aggregate.pending_events.append(event)
    return aggregate


@settings(max_examples=150, deadline=None)
@given(args=_schedules)
def test_a_lean_creation_is_the_librarys(args: dict[str, Any]) -> None:
    execution_id = uuid.uuid4()
    lean = StepExecution.schedule(execution_id=execution_id, **args)
    reference = library_schedule(execution_id, args)
    reference.limits = lean.limits
    assert vars(lean) == vars(reference)
    (made,) = lean.pending_events
    (expected,) = reference.pending_events
    assert type(made) is ev.StepScheduled
    assert list(vars(made).items()) == list(vars(expected).items())  # order too
    assert stored_body(made) == stored_body(expected)
    assert made.originator_id is execution_id
    assert lean.version == 1
    assert lean.created_on == lean.modified_on == args["timestamp"]


@settings(max_examples=50, deadline=None)
@given(args=_schedules)
def test_a_stored_creation_read_back_folds_to_the_same_aggregate(args: dict[str, Any]) -> None:
    # a replay creates the aggregate through StepScheduled.mutate from the decoded event
    execution_id = uuid.uuid4()
    live = StepExecution.schedule(execution_id=execution_id, **args)
    codec = EventCodec()
    pending: Any = live.pending_events
    (stored,) = codec.encode_many(pending, str(execution_id))
    (decoded,) = codec.decode_many([RecordedEvent(*stored, 1)])
    replayed = decoded.mutate(None)
    library = LIBRARY_MUTATE(decoded, None)
    replayed.limits = library.limits = live.limits
    assert vars(replayed) == vars(library)
    assert vars(replayed) == {**vars(live), "_pending_events": []}


#: the arguments a schedule cannot do without, at their simplest
MINIMAL: dict[str, Any] = {
    "timestamp": NOW,
    "step_id": "s",
    "step_version": "1",
    "definition": {},
    "input": {},
    "config": {},
}


def test_a_creation_with_a_non_uuid_id_is_refused_as_by_the_library() -> None:
    with pytest.raises(TypeError):
        StepExecution._create(ev.StepScheduled, id="not-a-uuid", **MINIMAL)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="UUID"):
        StepExecution.schedule(execution_id="not-a-uuid", **MINIMAL)  # type: ignore[arg-type]


def test_the_limits_given_are_the_aggregates() -> None:
    # the comparison above takes the lean path's limits as given: here they are the caller's
    limits = Limits(max_payload_bytes=1234)
    aggregate = StepExecution.schedule(execution_id=uuid.uuid4(), limits=limits, **MINIMAL)
    assert aggregate.limits is limits
