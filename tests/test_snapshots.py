"""Snapshots: loading from the newest snapshot plus the events after it gives exactly what a
full replay gives, at every version; a damaged snapshot is ignored, never trusted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings

import stepsource as ss
from stepsource.adapters.ports import Snapshot
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
