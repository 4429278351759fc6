"""Retries and time bounds of one ``ctx.do`` body: ``ctx.do(name, fn, retry=, timeout=)``.

A failed try that will be tried again is recorded (:class:`~stepsource.aggregates.events.
SubStepTryFailed`: the try number, the error and when the next try may start) and committed
before the backoff begins, so a worker that crashes during the backoff leaves a record the
next worker resumes from: it waits out what is left of the delay and runs the next try, never
try 1 again. Tries count within one attempt of the step; a retry of the whole step starts at
try 1. The backoff holds the worker (it is not a suspension): for delays of minutes, prefer
the step's own retries or ``ctx.sleep``.

Delays follow the :class:`~stepsource.engine.definitions.RetryPolicy` (``initial *
backoff**(n-1)`` capped at ``maximum``), scaled by a jitter factor derived from the
execution id, the name and the try number (a hash, never a process's random source), so a
replay computes the same delay. ``timeout`` bounds each try: an async body is cancelled at
the deadline; a sync body runs in a thread, which cannot be interrupted, so the try ends
when the body returns and counts as timed out (its result is discarded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from stepsource.engine.definitions import RetryPolicy
from stepsource.engine.recorder import Recorder
from stepsource.engine.scope import CONTROL_FLOW
from stepsource.errors import SubStepTimeoutError, UsageError

__all__ = [
    "DEFAULT_ATTEMPTS",
    "backoff_ms",
    "check_policy",
    "recorded_tries",
    "run_with_policy",
    "tries_of",
]

#: tries of a ctx.do body when its RetryPolicy leaves ``maximum_attempts`` unset
DEFAULT_ATTEMPTS = 3

#: the longest single sleep while waiting out a backoff (the clock is read again after it)
_POLL_SECONDS = 0.05


def backoff_ms(policy: RetryPolicy, failed_tries: int, execution_id: str, name: str) -> int:
    """Milliseconds between try ``failed_tries`` failing and the next try: the policy's delay
    scaled by the deterministic jitter of (execution, name, try)."""
    delay = policy.delay_seconds(failed_tries)
    if policy.jitter:
        digest = hashlib.sha256(f"{execution_id}\0{name}\0{failed_tries}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2**64  # in [0, 1)
        delay *= 1 + policy.jitter * (2 * unit - 1)
    return max(int(delay * 1000), 0)


def recorded_tries(recorder: Recorder, name: str) -> tuple[int, int | None]:
    """(failed tries recorded for ``ctx.do(name)`` in the open attempt, when the next may
    start): from the aggregate, or from the log's tail a resumed attempt has not folded in."""
    attempt = recorder.aggregate.next_attempt_number()
    known = recorder.aggregate.substep_try(name)
    tries, retry_at = 0, None
    if known is not None and known.get("attempt") == attempt:
        tries, retry_at = int(str(known["tries"])), int(str(known["retry_at_ms"]))
    for event in recorder.replay.pending_tries(name):
        if event.attempt == attempt and event.try_number > tries:
            tries, retry_at = event.try_number, event.retry_at_ms
    return tries, retry_at


async def _one_try(
    recorder: Recorder, name: str, body: Callable[[], Awaitable[Any]], timeout: float | None
) -> Any:
    if timeout is None:
        return await body()
    result: Any = None
    with anyio.move_on_after(timeout) as scope:
        result = await body()
    # a sync body's thread is not interrupted: it may return after the deadline passed
    if scope.cancelled_caught or anyio.current_time() >= scope.deadline:
        raise SubStepTimeoutError(name, timeout, **recorder.where())
    return result


async def _wait_until(recorder: Recorder, due_ms: int) -> None:
    clock = recorder.runtime.clock
    # a loop, not one sleep: a test clock may skip ahead while it waits
    while (left := due_ms - clock.now_ms()) > 0:  # noqa: ASYNC110
        await anyio.sleep(min(left / 1000, _POLL_SECONDS))


def check_policy(retry: RetryPolicy | None, timeout: float | None, where: dict[str, Any]) -> None:
    """Refuse a policy of the wrong type or a timeout that is not a positive number."""
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise UsageError(f"ctx.do retry= takes a RetryPolicy, not {retry!r}", **where)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise UsageError(f"ctx.do timeout= must be seconds > 0, not {timeout!r}", **where)


async def run_with_policy(
    recorder: Recorder,
    name: str,
    body: Callable[[], Awaitable[Any]],
    *,
    retry: RetryPolicy | None,
    timeout: float | None,
    scope: str,
) -> Any:
    """Run ``body`` until a try returns, recording each failed try that will be retried;
    the last try's error is raised (the caller records it as the sub-step's failure)."""
    tries, retry_at = recorded_tries(recorder, name)
    limit = 1 if retry is None else (retry.maximum_attempts or DEFAULT_ATTEMPTS)
    while True:
        if retry_at is not None:
            await _wait_until(recorder, retry_at)
            recorder.check_lease(f"try {tries + 1} of ctx.do({name!r})")
        tries += 1
        try:
            return await _one_try(recorder, name, body, timeout)
        except CONTROL_FLOW:
            raise
        except Exception as error:  # why: a failed try is recorded (or re-raised as the last)
            if retry is None or tries >= limit or not retry.is_retryable(error):
                raise
            agg = recorder.aggregate
            delay = backoff_ms(retry, tries, agg.execution_id, name)
            retry_at = recorder.runtime.clock.now_ms() + delay
            recorder.replay.finish_replay()
            op = recorder.closing_op(scope)
            op = (op[0], op[1], -2, op[3])  # not matched by position: read back by name
            agg.record_substep_try(
                name,
                try_number=tries,
                error=error,
                delay_ms=delay,
                retry_at_ms=retry_at,
                timestamp=recorder.now(),
                op=op,
            )
            await recorder.commit()


def tries_of(recorder: Recorder, name: str) -> int:
    """Tries of ``ctx.do(name)`` in the open attempt, its last (failed) one included."""
    return recorded_tries(recorder, name)[0] + 1
