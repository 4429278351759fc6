"""The write path's lean mechanisms: a value checked and copied in one walk, and the stored
JSON body of an event made once when a command records it, the event itself built without
the dataclass ``__init__``'s per-attribute frozen sets.

:func:`plain_json` is the hot path of :func:`~stepsource.aggregates.values.to_json`: one
walk over values of the exact JSON types (dict, list, str, int, float, bool, None) that
checks and copies them without building a path for each member; anything else (a tuple, a
subclass, a pydantic model, a value to refuse) makes it give up, and ``to_json``'s reference
walk does the work with its conversions and its worded errors.

What eventsourcing's Mapper stores for a domain event is its attributes but its id and
version, with ``class_version`` when above 1, through the transcoder (orjson here). The
aggregate serialises a recorded operation's event to exactly those bytes as it records it:
the payload limit is checked on them, the buffer bound counts them, and the engine's codec
writes them as they are (``engine/codec.py`` adds the checksum and the cipher) instead of
walking and serialising the value a second time. ``tests/test_codec_lean.py`` holds the
equivalence test against the Mapper; ``tests/test_encode_lean.py`` those of both paths.

:func:`create` makes a new aggregate from its creation event as the library's ``_create``
does, with the event built by :func:`build_event` and applied by the event's own one-call
``mutate`` (``StepScheduled``); ``tests/test_lifecycle_lean.py`` compares the two.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import orjson
from eventsourcing.utils import get_topic

__all__ = ["Unusual", "build_event", "create", "plain_json", "stored_body"]

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class Unusual(Exception):
    """The value needs the reference walk (a conversion, or an error to word)."""


def _text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain_json(value: Any, max_depth: int, max_key_length: int) -> Any:
    """A copy of ``value`` if it is plain strict JSON within the limits; else
    :class:`Unusual` (never a user error: the reference walk raises those)."""

    def walk(v: Any, depth: int) -> Any:
        if depth > max_depth:
            raise Unusual
        kind = type(v)
        if kind is str:
            if v.isascii() or _text(v):
                return v
            raise Unusual
        if kind is int:
            if _INT_MIN <= v <= _INT_MAX:
                return v
            raise Unusual
        if kind is dict:
            out = {}
            deeper = depth + 1
            for key, item in v.items():
                if type(key) is not str or len(key) > max_key_length or not _text(key):
                    raise Unusual
                out[key] = walk(item, deeper)
            return out
        if kind is list:
            deeper = depth + 1
            return [walk(item, deeper) for item in v]
        if v is None or kind is bool:
            return v
        if kind is float and math.isfinite(v):
            return v
        raise Unusual

    return walk(value, 0)


#: per event class: its class_version when above 1 (else 0)
_VERSIONS: dict[type[Any], int] = {}


def stored_body(event: Any) -> bytes:
    """The JSON the Mapper stores for ``event`` (a domain event with a ``__dict__``)."""
    cls = type(event)
    class_version = _VERSIONS.get(cls)
    if class_version is None:
        found = getattr(cls, "class_version", 1)
        class_version = _VERSIONS[cls] = found if found > 1 else 0
    state = dict(event.__dict__)
    del state["originator_id"]
    del state["originator_version"]
    if class_version:
        state["class_version"] = class_version
    return orjson.dumps(state)


def build_event(event_class: type[Any], values: dict[str, Any]) -> Any:
    """The event the class's dataclass ``__init__`` would build from ``values`` (consumed),
    without setting one frozen attribute at a time: the fields in their declared order (the
    stored JSON keeps it), defaults filled in, a missing or unknown field a TypeError."""
    event = object.__new__(event_class)
    state = event.__dict__
    for name, default in _fields(event_class):
        value = values.pop(name, default)
        if value is _REQUIRED:
            raise TypeError(f"{event_class.__name__} needs its field {name!r}")
        state[name] = value
    if values:
        raise TypeError(f"{event_class.__name__} has no field {next(iter(values))!r}")
    return event


def create(aggregate_class: type[Any], event_class: type[Any], **values: Any) -> Any:
    """The aggregate the library's ``_create`` makes from a creation event of ``values`` (its
    fields but the topic and the version), with that event pending: without the
    per-call topic check (every event class registers its topic at import), the id and
    init argument lookups and the kwargs copies (``tests/test_lifecycle_lean.py``)."""
    originator_id = values["originator_id"]
    if not isinstance(originator_id, uuid.UUID):  # as the event's own check would refuse
        raise TypeError(f"an aggregate id is a UUID, not {originator_id!r}")
    values["originator_topic"] = get_topic(aggregate_class)
    values["originator_version"] = aggregate_class.INITIAL_VERSION
    event = build_event(event_class, values)
    aggregate = event.mutate(None)
    aggregate.pending_events.append(event)
    return aggregate


_REQUIRED: Any = object()
_FIELDS: dict[type[Any], tuple[tuple[str, Any], ...]] = {}


def _fields(cls: type[Any]) -> tuple[tuple[str, Any], ...]:
    """An event class's fields in declared order, each with its default (or _REQUIRED)."""
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(
            (field.name, _REQUIRED if field.default is dataclasses.MISSING else field.default)
            for field in dataclasses.fields(cls)
        )
    return found
