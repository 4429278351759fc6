"""Global-scope state (seed 003): shared across executions, with TTL and compare-and-set.

It lives in the backend's key-value store (a table on SQLite, a KV bucket on NATS), the one
thing kept outside the log. Every read and write a handler makes is recorded in its own
stream, so a replay sees the values it saw and does not write again. A write happens before
its record (at least once); the stored envelope names the operation that wrote it, so an
operation re-run after a crash recognises its own write and a compare-and-set is not applied
twice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSON, to_json
from stepsource.errors import UsageError

if TYPE_CHECKING:
    from stepsource.engine.context import StepContext

__all__ = ["compare_and_set_global", "get_global", "set_global"]


def _ttl_ms(ctx: StepContext, ttl: float | None) -> int | None:
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
            execution_id=ctx.execution_id,
            step_id=ctx.info.step_id,
        )
    return max(1, int(ttl * 1000))


def _envelope(ctx: StepContext, value: JSON, writer: str) -> bytes:
    plain = orjson.dumps({"value": value, "writer": writer})
    return ctx._attempt.runtime.store.codec.seal(plain)  # encrypted at rest like the log


def _open(ctx: StepContext, data: bytes) -> tuple[JSON, str]:
    envelope = orjson.loads(ctx._attempt.runtime.store.codec.open(data))
    return envelope.get("value"), str(envelope.get("writer", ""))


def _writer(ctx: StepContext, op: tuple[int, str, int, str]) -> str:
    attempt, scope, seq, _version = op
    return f"{ctx.execution_id}:{attempt}:{scope}:{seq}"


async def get_global(ctx: StepContext, key: str, default: Any) -> Any:
    op = ctx._op("get_global_state")
    recorded = ctx._match(op, f"get_global_state({key!r})", ev.GlobalStateRead, None)
    if isinstance(recorded, ev.GlobalStateRead):
        return recorded.value if recorded.found else default
    attempt = ctx._attempt
    entry = await attempt.runtime.store.backend.kv_get(key, attempt.runtime.clock.now_ms())
    value = _open(ctx, entry.data)[0] if entry is not None else None
    attempt.aggregate.record_global(
        ev.GlobalStateRead,
        timestamp=attempt.now(),
        op=op,
        key=key,
        value=value,
        found=entry is not None,
    )
    await attempt.commit()
    return value if entry is not None else default


async def set_global(ctx: StepContext, key: str, value: Any, ttl: float | None) -> None:
    data = to_json(value, what=f"global state {key!r}", execution_id=ctx.execution_id)
    ttl_ms = _ttl_ms(ctx, ttl)
    op = ctx._op("set_global_state")
    if ctx._match(op, f"set_global_state({key!r})", ev.GlobalStateWritten, None) is not None:
        return
    attempt = ctx._attempt
    now_ms = attempt.runtime.clock.now_ms()
    await attempt.runtime.store.backend.kv_put(
        key, _envelope(ctx, data, _writer(ctx, op)), now_ms, ttl_ms
    )
    _record_written(ctx, op, key, data, ttl)
    await attempt.commit()


def _record_written(
    ctx: StepContext, op: tuple[int, str, int, str], key: str, data: JSON, ttl: float | None
) -> None:
    attempt = ctx._attempt
    attempt.aggregate.record_global(
        ev.GlobalStateWritten,
        timestamp=attempt.now(),
        op=op,
        key=key,
        value=data,
        ttl_seconds=None if ttl is None else float(ttl),
    )


async def compare_and_set_global(
    ctx: StepContext, key: str, expected: Any, value: Any, ttl: float | None
) -> bool:
    data = to_json(value, what=f"global state {key!r}", execution_id=ctx.execution_id)
    wanted = None if expected is None else to_json(expected, what="expected value")
    ttl_ms = _ttl_ms(ctx, ttl)
    op = ctx._op("compare_and_set_global_state")
    recorded = ctx._match(op, f"compare_and_set_global_state({key!r})", ev.Recorded, None)
    if isinstance(recorded, ev.GlobalStateWritten):
        return True
    if isinstance(recorded, ev.GlobalStateSwapRefused):
        return False
    if recorded is not None:
        raise ctx._attempt.replay.mismatch(f"compare_and_set_global_state({key!r})", recorded)
    attempt = ctx._attempt
    backend = attempt.runtime.store.backend
    now_ms = attempt.runtime.clock.now_ms()
    writer = _writer(ctx, op)
    entry = await backend.kv_get(key, now_ms)
    current, current_writer = _open(ctx, entry.data) if entry is not None else (None, "")
    if entry is not None and current_writer == writer:
        swapped = True  # this very operation wrote it before a crash: it already happened
    elif current != wanted:
        swapped = False
    else:
        revision = entry.revision if entry is not None else None
        done = await backend.kv_compare_and_set(
            key, revision, _envelope(ctx, data, writer), now_ms, ttl_ms
        )
        swapped = done is not None
        if not swapped:
            latest = await backend.kv_get(key, now_ms)
            current = _open(ctx, latest.data)[0] if latest is not None else None
    if swapped:
        _record_written(ctx, op, key, data, ttl)
    else:
        attempt.aggregate.record_global(
            ev.GlobalStateSwapRefused,
            timestamp=attempt.now(),
            op=op,
            key=key,
            expected=wanted,
            current=current,
        )
    await attempt.commit()
    return swapped
