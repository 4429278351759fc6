"""Parked means parked: an execution whose open attempt cannot resume on the deployed handler
records one StepParked and waits, unchanged, until an operator releases it."""

from __future__ import annotations

import logging
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
from stepsource.cli_inspect import takeovers

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


async def wait_for_parked(engine: ss.Engine, execution_id: str) -> list[ev.ExecutionEvent]:
    for _ in range(1000):
        events = await engine.events(execution_id)
        if isinstance(events[-1], ev.StepParked):
            return events
        await anyio.sleep(0.01)
    raise AssertionError([type(e).__name__ for e in events])


async def test_a_diverging_handler_parks_once_and_waits_for_another_handler(
    backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
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
        events = await wait_for_parked(diverging, handle.execution_id)
        # several leases later: nothing more appended, no lost-worker cutoff
        await anyio.sleep(2.0)
        assert await diverging.events(handle.execution_id) == events
        history = await diverging.history_of(handle.execution_id)
        assert history[-1].type == "parked"
        listed = await diverging.executions(status="parked")
        assert [row.execution_id for row in listed] == [handle.execution_id]
        assert listed[0].last_error is not None
        assert listed[0].last_error["step_version"] == "2"
    # the same handler deployed again does not take it up by itself; an operator's release
    # makes it try once more, and it is set aside again with nothing appended
    again = make_engine(backend_url, "2", shared)
    caplog.set_level(logging.INFO, logger="stepsource.worker")
    caplog.clear()
    async with again:
        await anyio.sleep(1.0)
        assert await again.events(handle.execution_id) == events
        # (a worker that takes a parked execution up says so: this one, the same handler, not)
        assert "back in the queue" not in caplog.text
        await again.release(handle.execution_id)
        await anyio.sleep(1.5)
        assert await again.events(handle.execution_id) == events
        assert [row.execution_id for row in await again.executions(status="parked")] == [
            handle.execution_id
        ]
    # a worker whose handler differs (here: the version that can resume it) takes it up by
    # itself, with no release
    fixed = make_engine(backend_url, "1", shared)
    caplog.clear()
    async with fixed:
        assert await fixed.get_handle(handle.execution_id).result(timeout=20) == ["fetched", "yes"]
        assert "put 1 parked execution(s) of step 'park.me' back in the queue" in caplog.text
        assert await fixed.executions(status="parked") == []
    final = await fixed.events(handle.execution_id)
    assert [type(e).__name__ for e in final].count("StepParked") == 1
    assert not any(isinstance(e, ev.StepFailed) for e in final)


async def _fetch_then_wait(ctx: ss.StepContext) -> Any:
    value = await ctx.do("fetch", lambda: "fetched")
    return [value, await ctx.wait_for_event("go", timeout=None)]


async def _store_then_wait(ctx: ss.StepContext) -> Any:  # a change that breaks replay
    await ctx.set_state("fetched", True)
    return ["stored", await ctx.wait_for_event("go", timeout=None)]


async def _fetch_then_wait_fixed(ctx: ss.StepContext) -> Any:  # the fix: the old path again
    value = await ctx.do("fetch", lambda: "fetched")
    return [value, await ctx.wait_for_event("go", timeout=None), "fixed"]


def deploy(url: str, handler: Any) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, lease_seconds=0.5)
    engine.step("park.code", version="1")(handler)
    return engine


async def test_a_worker_with_other_code_of_the_same_version_resumes_a_parked_execution(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    first = deploy(url, _fetch_then_wait)
    async with first:
        handle = await first.start("park.code")
        for _ in range(500):
            recorded = await first.events(handle.execution_id)
            if any(isinstance(e, ev.StepSuspended) for e in recorded):
                break
            await anyio.sleep(0.01)
    broken = deploy(url, _store_then_wait)  # same version, other code: diverges
    async with broken:
        await broken.get_handle(handle.execution_id).send_event("go", "yes")
        events = await wait_for_parked(broken, handle.execution_id)
        parked = events[-1]
        assert isinstance(parked, ev.StepParked)
        assert parked.code_hash == broken.definition("park.code").code_hash
        assert parked.code_hash != first.definition("park.code").code_hash
    fixed = deploy(url, _fetch_then_wait_fixed)
    async with fixed:
        result = await fixed.get_handle(handle.execution_id).result(timeout=20)
    assert result == ["fetched", "yes", "fixed"]


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


async def test_a_parked_execution_says_so_and_its_resumption_is_no_takeover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`show` and describe() said 'executing' while `ls` said 'parked'; the lease that resumed
    it after a fix was logged and listed as a takeover from a lost worker, and counted toward
    the lost-worker cutoff."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    first = deploy(url, _fetch_then_wait)
    async with first:
        handle = await first.start("park.code")
        for _ in range(500):
            if (await first.describe(handle.execution_id)).status == "waiting":
                break
            await anyio.sleep(0.01)
    broken = deploy(url, _store_then_wait)
    async with broken:
        await broken.get_handle(handle.execution_id).send_event("go", "yes")
        await wait_for_parked(broken, handle.execution_id)
        assert (await broken.describe(handle.execution_id)).status == "parked"
        # it said "It goes on running" though nothing will run it
        with pytest.raises(ss.ResultTimeout, match="it is parked") as waited:
            await broken.get_handle(handle.execution_id).result(timeout=0.1)
        assert "stepsource release ID" in (waited.value.hint or "")
    caplog.set_level(logging.INFO, logger="stepsource.worker")
    caplog.clear()
    fixed = deploy(url, _fetch_then_wait_fixed)
    async with fixed:
        assert await fixed.get_handle(handle.execution_id).result(timeout=20) == [
            "fetched",
            "yes",
            "fixed",
        ]
        events = await fixed.events(handle.execution_id)
    assert "taken over" not in caplog.text
    assert takeovers(events) == []  # what `stepsource history` lists
    aggregate, _ = await fixed.store.load(handle.execution_id)
    assert aggregate.leases_lost == 0
    await fixed.aclose()
