"""Arguments checked at the edge, the same on every backend, before anything is stored.

Names (steps, signals, events, updates), correlation ids, priorities, timeouts, and the size
of inputs and messages are checked here against the engine's
:class:`~stepsource.aggregates.values.Limits`, so a 50 MB input or a 1 MB signal name is
refused on memory and SQLite exactly as on NATS, with a StepsourceError naming the
execution and the fix, and never reaches a backend.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from stepsource.aggregates.values import Limits
from stepsource.errors import LimitExceededError, UsageError

__all__ = [
    "check_name",
    "check_optional_id",
    "check_priority",
    "check_size",
    "check_timeout",
    "json_size",
]

_INT64 = (-(2**63), 2**63 - 1)


def _valid_text(value: str, what: str, where: dict[str, Any]) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"{what} is not valid text (it holds a lone surrogate)",
            hint="Pass names as valid Unicode text",
            **where,
        ) from None


def check_name(value: object, what: str, limits: Limits, **where: Any) -> str:
    """A non-empty str of valid text, at most ``limits.max_key_length`` characters."""
    if not isinstance(value, str) or not value:
        got = "an empty one" if isinstance(value, str) else type(value).__name__
        raise UsageError(f"{what} must be a non-empty str, not {got}", **where)
    if len(value) > limits.max_key_length:
        raise LimitExceededError(
            f"{what} is {len(value)} characters long, over the limit of {limits.max_key_length}",
            hint="Use a shorter name",
            **where,
        )
    _valid_text(value, what, where)
    return value


def check_optional_id(value: object, what: str, limits: Limits, **where: Any) -> str | None:
    """None, or a bounded str of valid text (a correlation id)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(
            f"{what} must be a str or None, not {type(value).__name__}",
            hint="Pass an id such as an order number as a str",
            **where,
        )
    return check_name(value, what, limits, **where)


def check_priority(value: object, **where: Any) -> int | None:
    """None, or an int that fits 64 bits."""
    if value is None:
        return None
    hint = "Pass a whole number: the highest priority runs first (the default is 0)"
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"priority must be an int, not {type(value).__name__}", hint=hint, **where)
    if not _INT64[0] <= value <= _INT64[1]:
        raise UsageError("priority must fit 64 bits (from -2**63 to 2**63-1)", hint=hint, **where)
    return value


def check_timeout(value: object, what: str = "timeout", **where: Any) -> float | None:
    """None, or a number of seconds that is not NaN (infinity waits forever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise UsageError(f"{what} must be a number of seconds or None, not {value!r}", **where)
    return float(value)


def check_size(data: bytes, what: str, limits: Limits, **where: Any) -> bytes:
    """``data`` (the JSON of an input or a message) if it fits the payload limit."""
    if len(data) > limits.max_payload_bytes:
        raise LimitExceededError(
            f"{what} is {len(data)} bytes of JSON, over the payload limit of "
            f"{limits.max_payload_bytes}",
            hint="Store large data outside the execution and pass a reference, or raise the "
            "limit with Engine(max_payload_bytes=...)",
            **where,
        )
    return data


def json_size(value: object) -> bytes:
    """The JSON ``value`` stores as (already validated as strict JSON)."""
    return orjson.dumps(value)


#: what a commit holds beside the largest payload: the event's own fields, a definition
#: snapshot, the cipher's nonce and tag
PAYLOAD_HEADROOM = 4 * 1024


def check_payload_fits(limits: Limits, max_commit_bytes: int) -> None:
    """Refuse a ``max_payload_bytes`` the backend could never store in one commit: every
    input, state value or result near it would fail the execution that wrote it."""
    most = max_commit_bytes - PAYLOAD_HEADROOM
    if limits.max_payload_bytes > most:
        raise UsageError(
            f"max_payload_bytes {limits.max_payload_bytes} is more than this backend stores "
            f"with an event in one commit ({max_commit_bytes} bytes, less "
            f"{PAYLOAD_HEADROOM} for the event around it)",
            hint=f"Pass max_payload_bytes={most} or less, or raise the server's limit (NATS: "
            "max_payload)",
        )
