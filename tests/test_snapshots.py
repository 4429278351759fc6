"""Snapshots: loading from the newest snapshot plus the events after it gives exactly what a
full replay gives, at every version; a damaged snapshot is ignored, never trusted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend, RecordedEvent, Snapshot
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.projections.folds import checkpoints_of, state_of
from stepsource.testing.programs import register_program_step
from stepsource.testing.strategies import operation_programs

STEP = "snap.program"


def register(engine: ss.Engine) -> None:
    register_program_step(engine, STEP)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=operation_programs(max_size=30))
def test_snapshot_loads_equal_full_replays_at_every_version(program: list[list[Any]]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'snap.db'}"
            engine = ss.Engine(url, poll_interval=0.01, snapshot_every=3)
            register(engine)
            async with engine:
                handle = await engine.start(STEP, {"program": program})
                await handle.result(timeout=30)
            plain = ss.Engine(url, workers=0)  # no snapshots: every load is a full replay
            snapped = ss.Engine(url, workers=0, snapshot_every=3)
            events = await plain.events(handle.execution_id)
            backend = SQLiteBackend(str(Path(tmp) / "snap.db"))
            newest = await backend.latest_snapshot(handle.execution_id)
            assert newest is not None
            await backend.aclose()
            for version in range(1, len(events) + 1):
                full, _ = await plain.store.load(handle.execution_id, at_version=version)
                fast, tail = await snapped.store.load(
                    handle.execution_id, at_version=version, with_events=False
                )
                if version >= newest.version:  # the store keeps the newest snapshot only
                    assert len(tail) == version - newest.version
                assert state_of(fast) == state_of(full)
                assert checkpoints_of(fast) == checkpoints_of(full)
                assert fast.version == full.version == version
                assert fast.status == full.status
            await plain.aclose()
            await snapped.aclose()

    anyio.run(main)


def test_a_damaged_snapshot_is_ignored() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "snap.db")
            engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.01, snapshot_every=2)
            register(engine)
            program = [["set", "a", i] for i in range(6)]
            async with engine:
                handle = await engine.start(STEP, {"program": program})
                await handle.result(timeout=30)
            backend = SQLiteBackend(path)
            good = await backend.latest_snapshot(handle.execution_id)
            assert good is not None
            await backend.save_snapshot(
                Snapshot(good.stream_id, good.version + 100, good.topic, b"{not json")
            )
            await backend.aclose()
            aggregate, _ = await engine.store.load(handle.execution_id, with_events=False)
            assert aggregate.state == {"a": 5}
            await engine.aclose()

    anyio.run(main)


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


def _retrying_engine(
    backend: Backend, reads_history: bool, snapshot_every: int | None = 10
) -> ss.Engine:
    """Four attempts of 60 state writes each fail; the fifth writes 10 more and waits for an
    event (suspends), then resumes when it arrives: a long log of earlier attempts."""
    engine = ss.Engine(
        backend=backend,
        poll_interval=0.01,
        snapshot_every=snapshot_every,
        worker_id="w",
        seed=b"s",
    )

    @engine.step("snap.retry", max_retries=4, retry=ss.RetryPolicy(initial=0, backoff=1))
    async def retry(ctx: ss.StepContext) -> Any:
        for i in range(10 if ctx.retry_count == 4 else 60):
            await ctx.set_state("i", i)
        if ctx.retry_count < 4:
            raise RuntimeError(f"attempt {ctx.retry_count + 1} fails")
        value = await ctx.wait_for_event("go")
        entries = len(ctx.history) if reads_history else None
        return {"value": value, "history": entries}

    return engine


async def _resume_after_retries(reads_history: bool) -> tuple[Any, int, int]:
    backend = CountingBackend()
    engine = _retrying_engine(backend, reads_history)
    async with engine:
        handle = await engine.start("snap.retry")
        with anyio.fail_after(30):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        total = len(await engine.events(handle.execution_id))
        handle = engine.get_handle(handle.execution_id)
        with pytest.raises(ss.ResultTimeout):  # the handle reads the log once, up to now
            await handle.result(timeout=0.01)
        before = backend.events_read
        await handle.send_event("go", 7)
        output = await handle.result(timeout=30)
        return output, backend.events_read - before, total


@pytest.mark.anyio
async def test_a_resume_reads_the_open_attempt_and_not_the_attempts_before_it() -> None:
    output, read, total = await _resume_after_retries(reads_history=False)
    assert output == {"value": 7, "history": None}
    assert total > 250  # four failed attempts of 60 writes and the open one
    # the snapshot at or below the open attempt's start, then its own events: not the log
    assert read < 60


@pytest.mark.anyio
async def test_a_resumed_handler_reading_history_gets_all_of_it() -> None:
    output, read, total = await _resume_after_retries(reads_history=True)
    # the same execution without snapshots: every load reads the whole log
    plain = _retrying_engine(MemoryBackend(), True, snapshot_every=None)
    async with plain:
        handle = await plain.start("snap.retry")
        with anyio.fail_after(30):
            while (await plain.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        await handle.send_event("go", 7)
        expected = await handle.result(timeout=30)
    assert output == expected
    assert isinstance(output, dict)
    assert output["history"] > 250  # every entry since StepScheduled, not since a snapshot
    assert read >= total  # the run that read history read the whole log
