"""Strict JSON values (RFC 8259): what state, inputs, outputs and details may hold.

``to_json`` returns a normalized deep copy (tuples become lists, pydantic models their JSON
data) so that a value recorded in an event can never be changed afterwards by the caller's
own mutations; anything that is not JSON is refused with ``StateValueError`` and a path to
the offending part, and nothing is recorded.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from stepsource.aggregates.encoding import Unusual, plain_json
from stepsource.aggregates.secrets import Secret
from stepsource.errors import LimitExceededError, StateValueError, StepsourceError

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
JSONObject: TypeAlias = dict[str, JSON]

__all__ = [
    "JSON",
    "JSONObject",
    "Limits",
    "copy_json",
    "error_text",
    "start_headers",
    "state_key",
    "to_json",
    "to_json_object",
    "to_json_reference",
    "with_article",
]


def with_article(noun: str) -> str:
    """``noun`` after "a" or "an", as a message names a type or a kind ("an int")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def error_text(error: BaseException, limit: int = 4096, *, about: str | None = None) -> str:
    """``str(error)``, at most ``limit`` characters; a placeholder when ``str()`` raises,
    whatever it raises (an exception whose ``__str__`` raises SystemExit must not take the
    worker down while its failure is recorded). A StepsourceError about the execution
    ``about`` leaves out where it happened: what records or raises the text names it once."""
    try:
        if isinstance(error, StepsourceError) and about is not None and error.execution_id == about:
            return error.describe(where=False)[:limit]
        text = str(error)
    except BaseException:  # noqa: BLE001 - a __str__ that raises gives no message, nothing more
        text = "<exception str() failed>"
    return text[:limit]


def _is_pydantic_model(value: Any) -> bool:
    """Whether ``value`` is a pydantic model; no value can be one while pydantic is not
    imported, and a worker whose steps take no typed inputs never imports it."""
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(value, pydantic.BaseModel)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked before anything is recorded."""

    max_depth: int = 64
    max_key_length: int = 1024
    max_payload_bytes: int = 256 * 1024


DEFAULT_LIMITS = Limits()

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


_T = TypeVar("_T")


def copy_json(value: _T) -> _T:
    """A deep copy of JSON data (dicts, lists and scalars), several times cheaper than
    ``copy.deepcopy`` on the state a replay folds; anything else is deep-copied."""
    kind = type(value)
    if kind is dict:
        return {k: copy_json(v) for k, v in value.items()}  # type: ignore[attr-defined,return-value]
    if kind is list:
        return [copy_json(v) for v in value]  # type: ignore[attr-defined,return-value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    return copy.deepcopy(value)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_json(
    value: Any,
    *,
    what: str,
    execution_id: str | None = None,
    step_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> JSON:
    """Return ``value`` as strict JSON data, or raise naming ``what`` and where it failed."""
    try:  # the usual value: one walk, no paths built (aggregates/encoding.py)
        return plain_json(value, limits.max_depth, limits.max_key_length)  # type: ignore[no-any-return]
    except Unusual:
        return to_json_reference(
            value, what=what, execution_id=execution_id, step_id=step_id, limits=limits
        )


def to_json_reference(
    value: Any,
    *,
    what: str,
    execution_id: str | None = None,
    step_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> JSON:
    """:func:`to_json` by the walk that converts (tuples, subclasses, pydantic models) and
    words every refusal with the path to the offending part."""

    def refuse(path: str, why: str) -> StateValueError:
        return StateValueError(
            f"{what}{path} is {why}, which is not strict JSON",
            execution_id=execution_id,
            step_id=step_id,
            hint=(
                "Use dict (str keys), list, str, int, finite float, bool, None or a pydantic "
                "model; convert other types (dates to ISO strings, sets to lists) first"
            ),
        )

    def walk(v: Any, path: str, depth: int) -> JSON:
        if depth > limits.max_depth:
            raise LimitExceededError(
                f"{what} is nested deeper than {limits.max_depth} levels (at {what}{path})",
                execution_id=execution_id,
                step_id=step_id,
                hint="Flatten the value or store large structures outside the execution",
            )
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str):
            if not v.isascii() and not _is_utf8(v):
                raise refuse(path, "a str with unpaired surrogates (not valid Unicode text)")
            return v
        if isinstance(v, int):
            if not _INT_MIN <= v <= _INT_MAX:
                raise refuse(path, "an integer beyond 64 bits (store it as a str)")
            return int(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise refuse(path, f"{v!r} (NaN and Infinity are not JSON numbers)")
            return float(v)
        if _is_pydantic_model(v):
            # what the model holds, as it is (an output is checked against its annotation)
            return walk(v.model_dump(mode="json", warnings=False), path, depth)
        if isinstance(v, Secret):
            raise StateValueError(
                f"{what}{path} is a Secret, and secrets are never recorded",
                execution_id=execution_id,
                step_id=step_id,
                hint="Pass secrets to handlers through a service or configuration, not as "
                "recorded values; use Engine(cipher_key=...) for data that must be stored",
            )
        if isinstance(v, Mapping):
            out: dict[str, JSON] = {}
            for k, item in v.items():
                if not isinstance(k, str):
                    raise refuse(f"{path}[{k!r}]", f"keyed by {with_article(type(k).__name__)}")
                if not k.isascii() and not _is_utf8(k):
                    raise refuse(path, "keyed by a str with unpaired surrogates")
                if len(k) > limits.max_key_length:
                    raise LimitExceededError(
                        f"a key in {what}{path} is {len(k)} characters long, over the limit "
                        f"of {limits.max_key_length}",
                        execution_id=execution_id,
                        step_id=step_id,
                        hint="Use shorter keys",
                    )
                out[k] = walk(item, f"{path}[{k!r}]", depth + 1)
            return out
        if isinstance(v, (list, tuple)):
            return [walk(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(v)]
        raise refuse(path, with_article(type(v).__name__))

    return walk(value, "", 0)


def to_json_object(
    value: Any,
    *,
    what: str,
    execution_id: str | None = None,
    step_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> JSONObject:
    """Like :func:`to_json`, for values that must be a JSON object (a dict)."""
    data = to_json(value, what=what, execution_id=execution_id, step_id=step_id, limits=limits)
    if not isinstance(data, dict):
        raise StateValueError(
            f"{what} must be a JSON object (a dict with str keys), not "
            f"{with_article(type(data).__name__)}",
            execution_id=execution_id,
            step_id=step_id,
            hint="Pass a dict",
        )
    return data


def state_key(key: Any, limits: Limits, where: Callable[[], dict[str, Any]]) -> str:
    """``key`` as a key of an execution's state: a str within the key length limit
    (``where()``: the execution and step, for the error)."""
    if not isinstance(key, str):
        raise StateValueError(
            f"a state key must be a str, not {with_article(type(key).__name__)}",
            hint="Use string keys",
            **where(),
        )
    if len(key) > limits.max_key_length:
        raise LimitExceededError(
            f"state key is {len(key)} characters long, over the limit of {limits.max_key_length}",
            hint="Use shorter keys",
            **where(),
        )
    return key


def start_headers(headers: dict[str, str], where: dict[str, Any]) -> dict[str, str]:
    """Headers as stored: str keys and values, at most 64 pairs of 1 KiB each."""
    if len(headers) > 64 or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 1024 and len(v) <= 1024
        for k, v in headers.items()
    ):
        raise StateValueError(
            "start headers are at most 64 pairs of str of up to 1,024 characters",
            hint="Interceptors pass short string values such as a trace context",
            **where,
        )
    return dict(headers)
