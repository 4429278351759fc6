"""Global-scope state: shared across executions, with TTL and compare-and-set.

It lives in the backend's key-value store (a table on SQLite, a KV bucket on NATS), the one
thing kept outside the log. Every read and write a handler makes is recorded in its own
stream, so a replay sees the values it saw and does not write again. A write happens before
its record (at least once); the stored envelope names the operation that wrote it and, for a
compare-and-set, marks of the :data:`RECENT_WRITERS` compare-and-set writes before it, so a
compare-and-set re-run after a crash recognises its own write even when other executions
have swapped the value since (up to that many times), and is not applied twice.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import OpCoordinates
from stepsource.aggregates.values import JSON, to_json, with_article
from stepsource.engine.recorder import Recorder
from stepsource.errors import LimitExceededError, UsageError

__all__ = ["RECENT_WRITERS", "compare_and_set_global", "get_global", "set_global"]

#: compare-and-set writes of a key a re-run operation can find its own write among
RECENT_WRITERS = 32


def _ttl_ms(recorder: Recorder, ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not math.isfinite(ttl)
        or ttl <= 0
    ):
        raise UsageError(
            f"ttl must be a number of seconds > 0, not {ttl!r}",
            **recorder.where(),
        )
    return max(1, int(ttl * 1000))


def _check_key(recorder: Recorder, key: object, call: str) -> None:
    """A key no backend could hold, refused before anything is read, written or recorded
    (the backend's own rules, length and characters, are checked by its key-value store)."""
    if not isinstance(key, str) or not key:
        raise UsageError(
            f"ctx.{call}() needs a non-empty str key, not "
            f"{'an empty one' if key == '' else with_article(type(key).__name__)}",
            hint="Name shared values with str keys such as 'quota:api'",
            **recorder.where(),
        )


@contextmanager
def _named(recorder: Recorder) -> Iterator[None]:
    """The key-value store's refusal of a key or value (too long, a NUL, over the commit
    limit), raised again naming the execution and the step."""
    try:
        yield
    except (UsageError, LimitExceededError) as error:
        if error.execution_id is not None:
            raise
        raise type(error)(error.reason, hint=error.hint, **recorder.where()) from None


def _envelope(
    recorder: Recorder, value: JSON, writer: str, recent: list[str] | None = None
) -> bytes:
    envelope: dict[str, Any] = {"value": value, "writer": writer}
    if recent:
        envelope["recent"] = recent
    plain = orjson.dumps(envelope)
    return recorder.runtime.store.codec.seal(plain)  # encrypted at rest like the log


def _open(recorder: Recorder, data: bytes) -> tuple[JSON, str]:
    return _open_all(recorder, data)[:2]


def _open_all(recorder: Recorder, data: bytes) -> tuple[JSON, str, list[str]]:
    """The value, its writer, and the marks of the compare-and-set writers before it."""
    envelope = orjson.loads(recorder.runtime.store.codec.open(data))
    recent = envelope.get("recent")
    marks = [m for m in recent if isinstance(m, str)] if isinstance(recent, list) else []
    return envelope.get("value"), str(envelope.get("writer", "")), marks


def _mark(writer: str) -> str:
    """A short fixed-size mark of a writer (its operation's coordinates), kept in the
    envelopes of the compare-and-set writes after it."""
    return hashlib.blake2b(writer.encode(), digest_size=8).hexdigest()


def _writer(recorder: Recorder, op: OpCoordinates) -> str:
    attempt, scope, seq, _version = op
    return f"{recorder.execution_id}:{attempt}:{scope}:{seq}"


async def get_global(recorder: Recorder, key: str, default: Any) -> Any:
    _check_key(recorder, key, "get_global_state")
    op = recorder.op("get_global_state")
    recorded = recorder.match(op, f"get_global_state({key!r})", ev.GlobalStateRead, None)
    if isinstance(recorded, ev.GlobalStateRead):
        return recorded.value if recorded.found else default
    with _named(recorder):
        entry = await recorder.runtime.store.backend.kv_get(key, recorder.runtime.clock.now_ms())
    value = _open(recorder, entry.data)[0] if entry is not None else None
    recorder.aggregate.record_global(
        ev.GlobalStateRead,
        timestamp=recorder.now(),
        op=op,
        key=key,
        value=value,
        found=entry is not None,
    )
    await recorder.commit()
    return value if entry is not None else default


async def set_global(recorder: Recorder, key: str, value: Any, ttl: float | None) -> None:
    _check_key(recorder, key, "set_global_state")
    data = to_json(value, what=f"global state {key!r}", **recorder.where())
    ttl_ms = _ttl_ms(recorder, ttl)
    op = recorder.op("set_global_state")
    if recorder.match(op, f"set_global_state({key!r})", ev.GlobalStateWritten, None) is not None:
        return
    _record_written(recorder, op, key, data, ttl, check_only=True)
    recorder.check_lease(f"set_global_state({key!r})")
    now_ms = recorder.runtime.clock.now_ms()
    with _named(recorder):
        await recorder.runtime.store.backend.kv_put(
            key, _envelope(recorder, data, _writer(recorder, op)), now_ms, ttl_ms
        )
    _record_written(recorder, op, key, data, ttl)
    await recorder.commit()


def _record_written(
    recorder: Recorder,
    op: OpCoordinates,
    key: str,
    data: JSON,
    ttl: float | None,
    *,
    check_only: bool = False,
) -> None:
    """Record the write; ``check_only``: raise what recording it would raise for its size,
    before the store is written (a value the record refuses must never be stored: every
    execution reading it would fail in its turn)."""
    fields = {"key": key, "value": data, "ttl_seconds": None if ttl is None else float(ttl)}
    if check_only:
        recorder.aggregate.check_fits(
            ev.GlobalStateWritten, timestamp=recorder.now(), op=op, **fields
        )
        return
    recorder.aggregate.record_global(
        ev.GlobalStateWritten, timestamp=recorder.now(), op=op, **fields
    )


async def compare_and_set_global(
    recorder: Recorder, key: str, expected: Any, value: Any, ttl: float | None
) -> bool:
    _check_key(recorder, key, "compare_and_set_global_state")
    data = to_json(value, what=f"global state {key!r}", **recorder.where())
    wanted = None if expected is None else to_json(expected, what="expected", **recorder.where())
    ttl_ms = _ttl_ms(recorder, ttl)
    op = recorder.op("compare_and_set_global_state")
    recorded = recorder.match(op, f"compare_and_set_global_state({key!r})", ev.Recorded, None)
    if isinstance(recorded, ev.GlobalStateWritten):
        return True
    if isinstance(recorded, ev.GlobalStateSwapRefused):
        return False
    if recorded is not None:
        raise recorder.mismatch(f"compare_and_set_global_state({key!r})", recorded)
    _record_written(recorder, op, key, data, ttl, check_only=True)
    recorder.check_lease(f"compare_and_set_global_state({key!r})")
    backend = recorder.runtime.store.backend
    now_ms = recorder.runtime.clock.now_ms()
    writer = _writer(recorder, op)
    with _named(recorder):
        entry = await backend.kv_get(key, now_ms)
    current, current_writer, recent = (
        _open_all(recorder, entry.data) if entry is not None else (None, "", [])
    )
    if entry is not None and (current_writer == writer or _mark(writer) in recent):
        # this very operation swapped it before a crash (and others may have since): it
        # already happened
        swapped = True
    elif current != wanted:
        swapped = False
    else:
        revision = entry.revision if entry is not None else None
        # the writers before this one, newest first: a re-run of theirs finds its mark
        before = [_mark(current_writer), *recent] if entry is not None else []
        envelope = _envelope(recorder, data, writer, before[:RECENT_WRITERS])
        done = await backend.kv_compare_and_set(key, revision, envelope, now_ms, ttl_ms)
        swapped = done is not None
        if not swapped:
            latest = await backend.kv_get(key, now_ms)
            current = _open(recorder, latest.data)[0] if latest is not None else None
    if swapped:
        _record_written(recorder, op, key, data, ttl)
    else:
        recorder.aggregate.record_global(
            ev.GlobalStateSwapRefused,
            timestamp=recorder.now(),
            op=op,
            key=key,
            expected=wanted,
            current=current,
        )
    await recorder.commit()
    return swapped
