"""Queries at a version start from the nearest snapshot, and answer as a full replay does.

A step runs random programs of context operations over several attempts (all but the last
fail and are retried), on real SQLite and on memory, with snapshots every few events. Then,
at every version of its log, ``state_of``, ``checkpoints_of``, ``describe`` and
``history_of`` through an engine that loads from snapshots equal the same queries through an
engine that replays from version 1; ``describe`` also equals the record folded event by event
(the reference fold below, which the record kept on the aggregate replaced).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.aggregates import events as ev
from stepsource.projections.models import ExecutionAttempt, StepRecord
from stepsource.testing.programs import run_program_operations
from stepsource.testing.strategies import operation_programs

STEP = "snapq.program"
EVERY = 3


class CountingBackend(MemoryBackend):
    """The memory reference, counting the events its streams hand out."""

    def __init__(self) -> None:
        super().__init__()
        self.events_read = 0

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        records = await super().read_stream(stream_id, from_version, to_version)
        self.events_read += len(records)
        return records


def _ms(event: ev.ExecutionEvent) -> int:
    return int(event.timestamp.timestamp() * 1000)


def reference_attempts(events: list[ev.ExecutionEvent]) -> tuple[Any, ...]:
    """The record's attempts, start, schedule, update time and retry count, folded event by
    event (how ``describe`` computed them before the aggregate kept them)."""
    attempts: dict[int, dict[str, Any]] = {}
    next_scheduled = _ms(events[0])
    current: dict[str, Any] | None = None
    start: int | None = None
    for event in events:
        now = _ms(event)
        if isinstance(event, ev.StepLeased):
            current = attempts.setdefault(
                event.attempt,
                {
                    "id": event.attempt,
                    "scheduled": next_scheduled,
                    "polled": now,
                    "start": None,
                    "runs": 0,
                    "output": None,
                },
            )
            current["runs"] += 1
            current["executor"] = event.executor
            current["ref"] = event.worker_id
        elif isinstance(event, ev.StepStarted) and current is not None:
            current["start"] = now
            start = now if start is None else start
        elif isinstance(event, ev.AttemptFailed) and current is not None:
            error = {"type": event.error_type, "message": event.error_message}
            current["output"] = {"error": error}
            next_scheduled = event.retry_at_ms if event.retry_at_ms is not None else now
        if current is not None:
            current["updated"] = now
    executions = tuple(
        ExecutionAttempt(
            id=a["id"],
            scheduled=a["scheduled"],
            polled=a["polled"],
            start=a["start"],
            updated=a["updated"],
            executor=a.get("executor"),
            ref=a.get("ref"),
            runs=a["runs"],
            output=a["output"],
        )
        for a in sorted(attempts.values(), key=lambda a: a["id"])
    )
    retries = sum(
        1 for e in events if isinstance(e, ev.AttemptFailed) and e.retry_at_ms is not None
    )
    return executions, start, _ms(events[0]), _ms(events[-1]), retries


def _attempt_fields(record: StepRecord) -> tuple[Any, ...]:
    return record.executions, record.start, record.schedule, record.updated, record.retry_count


def _engine(backend: Backend | None, url: str | None, every: int | None) -> ss.Engine:
    return ss.Engine(
        url, backend=backend, workers=0 if every is None else 1, snapshot_every=every,
        poll_interval=0.01,
    )  # fmt: skip


async def _check(backend: Backend | None, url: str | None, attempts: list[Any]) -> None:
    writer = _engine(backend, url, EVERY)

    @writer.step(STEP, max_retries=len(attempts), retry=ss.RetryPolicy(initial=0, backoff=1))
    async def program(ctx: ss.StepContext) -> int:
        ops = attempts[ctx.retry_count]
        await run_program_operations(ctx, ops)
        if ctx.retry_count < len(attempts) - 1:
            raise RuntimeError(f"attempt {ctx.retry_count + 1} fails")
        return len(ops)

    async with writer:
        handle = await writer.start(STEP)
        await handle.result(timeout=30)
    plain = _engine(backend, url, None)  # no snapshots: every query replays from version 1
    snapped = _engine(backend, url, EVERY)
    execution_id = handle.execution_id
    events = await plain.events(execution_id)
    store = snapped.store.backend
    latest = await store.latest_snapshot(execution_id)
    assert latest is not None
    for version in range(1, len(events) + 1):
        for query in ("state_of", "checkpoints_of", "describe", "history_of"):
            full = await getattr(plain, query)(execution_id, at_version=version)
            before = backend.events_read if isinstance(backend, CountingBackend) else 0
            fast = await getattr(snapped, query)(execution_id, at_version=version)
            assert fast == full, (query, version)
            if isinstance(backend, CountingBackend) and query != "history_of":
                read = backend.events_read - before
                if version >= latest.version:  # from the latest snapshot: its tail only
                    assert read == version - latest.version
        record = await snapped.describe(execution_id, at_version=version)
        assert _attempt_fields(record) == reference_attempts(events[:version])
    assert len({e.attempt for e in events if isinstance(e, ev.StepLeased)}) == len(attempts)
    await plain.aclose()
    await snapped.aclose()


_attempts = st.lists(operation_programs(max_size=8), min_size=1, max_size=3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attempts=_attempts)
def test_queries_at_every_version_equal_full_replays_on_memory(attempts: list[Any]) -> None:
    anyio.run(_check, CountingBackend(), None, attempts)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attempts=_attempts)
def test_queries_at_every_version_equal_full_replays_on_sqlite(attempts: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(_check, None, f"sqlite:///{Path(tmp) / 'snapq.db'}", attempts)
