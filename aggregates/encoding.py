"""The stored JSON body of an event, made once when a command records it.

What eventsourcing's Mapper stores for a domain event is its attributes but its id and
version, with ``class_version`` when above 1, through the transcoder (orjson here). The
aggregate serialises a recorded operation's event to exactly those bytes as it records it:
the payload limit is checked on them, the buffer bound counts them, and the engine's codec
writes them as they are (``engine/codec.py`` adds the checksum and the cipher) instead of
walking and serialising the value a second time. ``tests/test_codec_lean.py`` holds the
equivalence test against the Mapper.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["stored_body"]

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
