"""Parked means parked: an execution whose open attempt cannot resume on the deployed handler
records one StepParked and waits, unchanged, until an operator releases it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend
from stepsource.aggregates import events as ev

pytestmark = pytest.mark.anyio


def make_engine(url: str, version: str, backend: Backend | None = None) -> ss.Engine:
    """An engine deploying ``version`` of the step; on memory:// the deploys share one log
    object (``backend``), as processes share a file or a server."""
    engine = ss.Engine(url, poll_interval=0.01, lease_seconds=0.5, backend=backend)

    # a deploy of another version (not declared compatible) cannot resume an open attempt
    @engine.step("park.me", version=version)
    async def handler(ctx: ss.StepContext) -> Any:
        value = await ctx.do("fetch", lambda: "fetched")
        approval = await ctx.wait_for_event("go", timeout=None)
        return [value, approval]

    return engine


async def test_a_diverging_handler_parks_once_and_waits_until_released(backend_url: str) -> None:
    shared = MemoryBackend() if backend_url == "memory://" else None
    old = make_engine(backend_url, "1", shared)
    async with old:
        handle = await old.start("park.me")
        for _ in range(500):
            if any(isinstance(e, ev.StepSuspended) for e in await old.events(handle.execution_id)):
                break
            await anyio.sleep(0.01)
    diverging = make_engine(backend_url, "2", shared)
    async with diverging:
        await diverging.get_handle(handle.execution_id).send_event("go", "yes")
        for _ in range(1000):
            events = await diverging.events(handle.execution_id)
            if isinstance(events[-1], ev.StepParked):
                break
            await anyio.sleep(0.01)
        assert isinstance(events[-1], ev.StepParked), [type(e).__name__ for e in events]
        # several leases later: nothing more appended, no lost-worker cutoff
        await anyio.sleep(2.0)
        assert await diverging.events(handle.execution_id) == events
        history = await diverging.history_of(handle.execution_id)
        assert history[-1].type == "parked"
    fixed = make_engine(backend_url, "1", shared)
    async with fixed:
        await fixed.release(handle.execution_id)
        assert await fixed.get_handle(handle.execution_id).result(timeout=20) == ["fetched", "yes"]
    final = await fixed.events(handle.execution_id)
    assert [type(e).__name__ for e in final].count("StepParked") == 1
    assert not any(isinstance(e, ev.StepFailed) for e in final)


def test_the_cli_refuses_to_release_an_execution_that_is_not_parked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def seed() -> str:
        engine = ss.Engine(url, workers=0)

        @engine.step("park.idle")
        async def idle(ctx: ss.StepContext) -> None:
            return None

        async with engine:
            return (await engine.start("park.idle")).execution_id

    execution_id = anyio.run(seed)
    run = subprocess.run(
        [sys.executable, "-m", "stepsource", "--url", url, "release", execution_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "not parked" in run.stderr
