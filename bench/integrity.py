"""The cost of the per-event checksum on replay and on a projection rebuild.

``python -m bench.integrity [EVENTS]`` decodes one long stream (a replay's read) and rebuilds
the executions index over many executions, once with checksummed events (what this release
writes) and once with the same events stripped of their checksum (a log written before
checksums, read as before), and prints events per second for each. Best of five runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Commit, NewEvent
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.checksums import strip_checksum
from stepsource.engine.codec import EventCodec
from stepsource.engine.readmodels import ReadModels
from stepsource.engine.store import ExecutionStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _stream(events: int) -> tuple[str, list[NewEvent]]:
    """One execution: scheduled, started, then ``events - 2`` state writes."""
    aggregate = StepExecution.schedule(
        execution_id=uuid.uuid4(),
        timestamp=NOW,
        step_id="bench",
        step_version="1",
        definition={},
        input={"n": 1},
        config={},
    )
    aggregate.lease(timestamp=NOW, worker_id="w", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=NOW, worker_id="w", step_version="1")
    for i in range(events - 3):
        aggregate.set_state(f"k{i % 10}", i, timestamp=NOW, op=(1, "", i, "1"))
    stream = aggregate.execution_id
    return stream, EventCodec().encode_many(aggregate.collect_events(), stream)


def _legacy(events: Sequence[NewEvent]) -> list[NewEvent]:
    return [
        NewEvent(
            e.stream_id,
            e.version,
            e.topic,
            strip_checksum(e.stream_id, e.version, e.topic, e.data)[0],
        )
        for e in events
    ]


def _best(run: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


async def _replay(events: int) -> dict[str, float]:
    stream, checked = _stream(events)
    out: dict[str, float] = {}
    for name, stored in (("checksummed", checked), ("without checksums", _legacy(checked))):
        backend = MemoryBackend()
        await backend.append(Commit(stream, 0, stored))
        records = await backend.read_stream(stream)
        store = ExecutionStore(backend, EventCodec())
        out[name] = len(records) / _best(lambda: store.decode(records))  # noqa: B023
    return out


async def _rebuild(executions: int, each: int) -> dict[str, float]:
    streams = [_stream(each) for _ in range(executions)]
    out: dict[str, float] = {}
    for name, strip in (("checksummed", False), ("without checksums", True)):
        backend = MemoryBackend()
        for stream, stored in streams:
            await backend.append(Commit(stream, 0, _legacy(stored) if strip else stored))
        models = ReadModels(ExecutionStore(backend, EventCodec()), None)
        best = float("inf")
        for _ in range(3):
            report = await models.rebuild()
            best = min(best, report.seconds)
        out[name] = executions * each / best
        await models.aclose()
    return out


async def main(events: int) -> None:
    replay = await _replay(events)
    rebuild = await _rebuild(max(events // 50, 10), 50)
    for what, figures in (("replay decode", replay), ("projection rebuild", rebuild)):
        with_sum, without = figures["checksummed"], figures["without checksums"]
        print(
            f"{what}: {with_sum:,.0f} events/s checksummed, {without:,.0f} events/s "
            f"without checksums ({(without / with_sum - 1) * 100:+.1f}% time for the check)"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
