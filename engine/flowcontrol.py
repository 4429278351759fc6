"""Flow control: a step's concurrency limit and rate limit, across every worker of a backend.

``@engine.step(..., concurrency=N, concurrency_key=..., rate_limit="100/minute")``.

Both limits live in the backend's global key-value store (the storage port's ``kv_get`` and
``kv_compare_and_set``), so they hold on every backend without backend-specific code:

- **Concurrency slots** are leased tokens: one entry per step (and per value of the
  concurrency key) maps each execution holding a slot to when its token lapses. An actor takes
  a token after it leased the execution and before it runs the handler, renews it with its
  lease (:func:`renew_slots`, from the worker's renewal loop) and gives it back when its run
  ends: completed, failed, retrying, or suspended (a sleeping or waiting execution holds no
  slot). A dead worker's tokens lapse with its lease, so its slots free themselves.
- **The rate limit** is a sliding window: the entry keeps the start times of the attempts
  begun in the last window; a new attempt (a first run or a retry; a resume is not one) may
  begin while fewer than the limit began in the window.

An execution refused a slot or a rate unit holds no worker: it records StepThrottled once
(its status is ``throttled`` until it is admitted) and its lease is given back with a due
time (the moment the window has room for the rate; a fallback retry for a slot), and the
queue hands it to any worker then. An execution refused a slot also joins the slot's
*waiters* (an entry beside the slots): a run that gives its slot back nudges the oldest
waiter (an inbox item that only wakes it, as a child's end wakes its parent), so it is
leased at once rather than at its fallback retry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from stepsource.adapters.ports import QueueUpdate
from stepsource.aggregates.execution import StepExecution
from stepsource.errors import BackendUnavailableError, UsageError

__all__ = [
    "FlowLimits",
    "Refusal",
    "admit",
    "build_limits",
    "free_slot",
    "hold_back",
    "renew_slots",
    "take_rate",
]

#: how long an execution refused a concurrency slot waits before it tries again if no freed
#: slot wakes it first (ms)
SLOT_RETRY_MS = 1000

#: the longest rate-limit window (366 days): the window's entry lives that long
MAX_RATE_WINDOW_MS = 366 * 86_400_000

#: compare-and-set tries before an admission gives up for now (and tries again later)
_CAS_TRIES = 20

_UNITS = {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(second|minute|hour|day)s?\s*$")


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """A step's flow-control settings (validated at decoration time)."""

    step_id: str
    concurrency: int | None = None
    concurrency_key: str | Callable[[Mapping[str, Any]], object] | None = None
    rate_count: int | None = None
    rate_window_ms: int = 0

    def key_of(self, data: Mapping[str, Any], execution_id: str | None = None) -> str:
        """The value of the concurrency key for this input, its parameters' defaults filled
        in (:meth:`~.definitions.StepDefinition.input_with_defaults`; '' when there is no
        key); UsageError naming the step when a key function raises."""
        key = self.concurrency_key
        if key is None:
            return ""
        if isinstance(key, str):
            return str(data.get(key, ""))
        try:
            return str(key(data))
        except Exception as error:  # noqa: BLE001 - the user's function, reported as theirs
            raise UsageError(
                f"concurrency_key of step {self.step_id!r} raised "
                f"{type(error).__name__}: {error} for this input",
                execution_id=execution_id,
                step_id=self.step_id,
                hint="Make the key function answer every input the step accepts "
                '(data.get("region", "default")), or name an input field: '
                'concurrency_key="region"',
            ) from None

    def kv_key(self, kind: str, key_value: str) -> str:
        digest = hashlib.sha256(f"{self.step_id}\x00{key_value}".encode()).hexdigest()[:40]
        return f"stepsource-flow-{kind}-{digest}"


def build_limits(
    step_id: str, concurrency: object, concurrency_key: object, rate_limit: object
) -> FlowLimits | None:
    """The step's limits, None without any, or UsageError naming the bad value."""
    if concurrency is None and concurrency_key is None and rate_limit is None:
        return None
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise UsageError(
            f"concurrency must be an int >= 1, not {concurrency!r}",
            step_id=step_id,
            hint="With concurrency=N, at most N executions of the step run at once",
        )
    if concurrency_key is not None and not (
        (isinstance(concurrency_key, str) and concurrency_key) or callable(concurrency_key)
    ):
        raise UsageError(
            f"concurrency_key must be an input field name or a function of the input, not "
            f"{concurrency_key!r}",
            step_id=step_id,
            hint='concurrency_key="customer_id" or concurrency_key=lambda data: data["region"]',
        )
    if concurrency_key is not None and concurrency is None and rate_limit is None:
        raise UsageError(
            "concurrency_key needs concurrency= or rate_limit= to apply to",
            step_id=step_id,
            hint="Add concurrency=N (at most N at once per key)",
        )
    count, window = None, 0
    if rate_limit is not None:
        match = _RATE.match(rate_limit) if isinstance(rate_limit, str) else None
        if match is not None:
            count = int(match.group(1))
            window = int(match.group(2) or 1) * _UNITS[match.group(3)]
        if match is None or count is None or count < 1 or not 0 < window <= MAX_RATE_WINDOW_MS:
            raise UsageError(
                f"rate_limit must read like '100/minute' (N/[M]second|minute|hour|day with "
                f"N >= 1 and a window of 1 second to 366 days), not {rate_limit!r}",
                step_id=step_id,
                hint='rate_limit="100/minute", "5/second", "10/5minutes" or "1000/day"',
            )
    return FlowLimits(
        step_id=step_id,
        concurrency=concurrency,
        concurrency_key=concurrency_key,
        rate_count=count,
        rate_window_ms=window,
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an execution may not run now ("concurrency" or "rate"), and when to try again."""

    reason: str
    retry_at_ms: int


async def admit(
    runtime: Any, limits: FlowLimits, aggregate: StepExecution, key_value: str, *, new_attempt: bool
) -> Refusal | None:
    """Take a concurrency slot (and a rate unit for a new attempt) for the leased execution
    whose concurrency key is ``key_value`` (:meth:`FlowLimits.key_of`); None when admitted,
    else the refusal (nothing is held then)."""
    backend = runtime.store.backend
    eid = aggregate.execution_id
    now_ms: int = runtime.clock.now_ms()
    if limits.concurrency is not None:
        slots = limits.kv_key("slots", key_value)
        waiters = _waiters_key(slots)
        if not await _take_slot(backend, slots, eid, limits.concurrency, now_ms, runtime.lease_ms):
            await _update_waiters(backend, waiters, now_ms, runtime.lease_ms, add=eid)
            return Refusal("concurrency", now_ms + SLOT_RETRY_MS)
        runtime.held_slots[eid] = slots
        if aggregate.status == "throttled":  # it waited: it is a waiter no more
            await _update_waiters(backend, waiters, now_ms, runtime.lease_ms, remove=eid)
    if limits.rate_count is not None and new_attempt:
        rate = limits.kv_key("rate", key_value)
        retry_at = await take_rate(backend, rate, limits.rate_count, limits.rate_window_ms, now_ms)
        if retry_at is not None:
            await free_slot(runtime, eid)
            return Refusal("rate", retry_at)
    return None


async def hold_back(runtime: Any, aggregate: StepExecution, refusal: Refusal) -> None:
    """Put the refused execution back in the queue, holding nothing; the first refusal of a
    wait records StepThrottled (its status shows it waits for flow control)."""
    eid = aggregate.execution_id
    runtime.giving_up.add(eid)
    if aggregate.status == "throttled":  # shown already: back to the queue only
        await runtime.store.backend.release(runtime.worker_id, eid, due_ms=refusal.retry_at_ms)
        return
    aggregate.throttle(refusal.reason, refusal.retry_at_ms, timestamp=runtime.clock.now())
    queue = QueueUpdate(
        kind="enqueue",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=refusal.retry_at_ms,
    )
    await runtime.store.commit(aggregate, queue=queue, lease_owner=runtime.worker_id)
    runtime.on_change(eid)


def _waiters_key(slots_key: str) -> str:
    return slots_key.replace("-slots-", "-waiters-", 1)


async def _update_waiters(
    backend: Any,
    key: str,
    now_ms: int,
    lease_ms: int,
    *,
    add: str | None = None,
    remove: str | None = None,
) -> str | None:
    """Add or remove a waiter (each kept for a few leases: a waiter that went away lapses),
    or with neither, take the oldest one out; the waiter taken out, if any."""
    ttl = 10 * lease_ms
    for _ in range(_CAS_TRIES):
        entry = await backend.kv_get(key, now_ms)
        waiters = _live(entry, now_ms)
        taken = None
        if add is not None:
            if add in waiters:
                return None
            waiters[add] = now_ms + ttl
        elif remove is not None:
            if waiters.pop(remove, None) is None:
                return None
        else:
            if not waiters:
                return None
            taken = min(waiters, key=lambda eid: (waiters[eid], eid))  # the longest waiting
            del waiters[taken]
        if await _swap(backend, key, entry, waiters, now_ms, ttl) is not None:
            return taken
    return None


async def _take_slot(
    backend: Any, key: str, eid: str, limit: int, now_ms: int, lease_ms: int
) -> bool:
    for _ in range(_CAS_TRIES):
        entry = await backend.kv_get(key, now_ms)
        holders = _live(entry, now_ms)
        if eid not in holders and len(holders) >= limit:
            return False
        holders[eid] = now_ms + lease_ms
        if await _swap(backend, key, entry, holders, now_ms, lease_ms) is not None:
            return True
    return False


async def take_rate(backend: Any, key: str, limit: int, window_ms: int, now_ms: int) -> int | None:
    for _ in range(_CAS_TRIES):
        entry = await backend.kv_get(key, now_ms)
        starts: list[int] = orjson.loads(entry.data) if entry is not None else []
        starts = sorted(s for s in starts if s > now_ms - window_ms)
        if len(starts) >= limit:
            return int(starts[len(starts) - limit]) + window_ms
        starts.append(now_ms)
        revision = entry.revision if entry is not None else None
        if await backend.kv_compare_and_set(key, revision, orjson.dumps(starts), now_ms, window_ms):
            return None
    return now_ms + SLOT_RETRY_MS


def _live(entry: Any, now_ms: int) -> dict[str, int]:
    if entry is None:
        return {}
    holders: dict[str, int] = orjson.loads(entry.data)
    return {eid: until for eid, until in holders.items() if until > now_ms}


async def _swap(
    backend: Any, key: str, entry: Any, holders: dict[str, int], now_ms: int, lease_ms: int
) -> Any:
    revision = entry.revision if entry is not None else None
    data = orjson.dumps(holders)
    return await backend.kv_compare_and_set(key, revision, data, now_ms, 2 * lease_ms)


async def free_slot(runtime: Any, execution_id: str) -> None:
    """Give back the execution's concurrency slot, if this worker holds one. Best effort: a
    slot not given back lapses with the worker's lease."""
    key = runtime.held_slots.pop(execution_id, None)
    if key is None:
        return
    backend = runtime.store.backend
    now_ms = runtime.clock.now_ms()
    try:
        for _ in range(_CAS_TRIES):
            entry = await backend.kv_get(key, now_ms)
            holders = _live(entry, now_ms)
            if execution_id not in holders:
                return
            del holders[execution_id]
            if await _swap(backend, key, entry, holders, now_ms, runtime.lease_ms) is not None:
                break
        else:
            return
        # the freed slot goes to the longest waiter at once: an inbox item that only wakes it
        waiter = await _update_waiters(backend, _waiters_key(key), now_ms, runtime.lease_ms)
        if waiter is not None:
            await backend.post(waiter, "child", "slot-freed", b"{}", now_ms)
    except BackendUnavailableError:
        return


async def renew_slots(runtime: Any, execution_ids: Sequence[str]) -> None:
    """Extend the tokens of the slots these executions hold with their leases."""
    now_ms = runtime.clock.now_ms()
    backend = runtime.store.backend
    for eid in execution_ids:
        key = runtime.held_slots.get(eid)
        if key is None:
            continue
        for _ in range(_CAS_TRIES):
            entry = await backend.kv_get(key, now_ms)
            holders = _live(entry, now_ms)
            holders[eid] = now_ms + runtime.lease_ms
            if await _swap(backend, key, entry, holders, now_ms, runtime.lease_ms) is not None:
                break
