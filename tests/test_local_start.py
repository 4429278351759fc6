"""Local start: an execution started where a worker pool runs its step skips the queue.

One commit holds StepScheduled, StepLeased and StepStarted (the queue row leased to this
worker) and the pool runs the handler in a slot reserved for it. What a user relies on: the
log is the one the queue path writes, a full pool still queues, a refused start gives its slot
back, and an end in this process reaches the handle. (A local start whose process is killed
is resumed elsewhere: tests/test_worker_process.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.ports import Lease
from stepsource.adapters.sqlite import SQLiteBackend

pytestmark = pytest.mark.anyio


def _steps(engine: ss.Engine) -> None:
    @engine.step("ls.echo")
    async def echo(ctx: ss.StepContext, value: int) -> dict[str, int]:
        await ctx.set_state("seen", value)
        return {"value": value}


def _shape(events: Sequence[object]) -> list[str]:
    return [type(e).__name__ for e in events]


async def test_a_local_start_writes_the_queue_paths_log_in_fewer_commits(tmp_path: Path) -> None:
    queued_engine = ss.Engine(f"sqlite:///{tmp_path / 'queued.db'}", workers=0)
    _steps(queued_engine)
    runner = queued_engine.derive(workers=1, poll_interval=0.01)
    async with queued_engine:
        handle = await queued_engine.start("ls.echo", {"value": 1})
        async with runner:
            assert await handle.result(timeout=30) == {"value": 1}
        queued = await queued_engine.events(handle.execution_id)

    local = ss.Engine(f"sqlite:///{tmp_path / 'local.db'}", workers=1)
    _steps(local)
    async with local:
        backend = local._backend
        assert isinstance(backend, SQLiteBackend)
        before = backend.commits_written
        handle = await local.start("ls.echo", {"value": 1})
        assert await handle.result(timeout=30) == {"value": 1}
        commits = backend.commits_written - before
        here = await local.events(handle.execution_id)

    assert _shape(here) == _shape(queued)
    assert _shape(here)[:3] == ["StepScheduled", "StepLeased", "StepStarted"]
    assert here[1].worker_id == local.worker_id  # type: ignore[attr-defined]
    # scheduled+leased+started, then the state write and completion share the attempt's end
    # (the state write is buffered until that boundary); the queue path needs a commit more
    assert commits == 2


async def test_a_full_pool_queues_the_start_and_runs_it_when_a_slot_frees(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, workers=1, poll_interval=0.01)
    gate = anyio.Event()
    order: list[str] = []

    @engine.step("ls.held")
    async def held(ctx: ss.StepContext, name: str) -> str:
        order.append(name)
        if name == "first":
            await gate.wait()
        return name

    async with engine:
        first = await engine.start("ls.held", {"name": "first"})
        second = await engine.start("ls.held", {"name": "second"})
        with anyio.fail_after(30):
            while order != ["first"]:
                await anyio.sleep(0.01)
        assert _shape(await engine.events(second.execution_id)) == ["StepScheduled"]
        gate.set()
        assert await first.result(timeout=30) == "first"
        assert await second.result(timeout=30) == "second"
    assert order == ["first", "second"]


async def test_a_start_queued_behind_a_full_pool_runs_at_the_end_without_waiting_for_a_poll(
    backend_url: str,
) -> None:
    """The end of the running execution leases the queued one at once: the poll (an hour
    here) never has to find it."""
    engine = ss.Engine(backend_url, workers=1, poll_interval=3600)
    gate = anyio.Event()

    @engine.step("ls.gated")
    async def gated(ctx: ss.StepContext, name: str) -> str:
        if name == "first":
            await gate.wait()
        return name

    async with engine:
        first = await engine.start("ls.gated", {"name": "first"})
        second = await engine.start("ls.gated", {"name": "second"})  # queued: no free slot
        gate.set()
        assert await first.result(timeout=30) == "first"
        assert await second.result(timeout=30) == "second"


#: backends whose starts run where they are made (NATS leases every start through the queue)
LOCAL_STARTS = ["memory", "sqlite", "redis", "postgres"]


@pytest.mark.parametrize("backend_url", LOCAL_STARTS, indirect=True)
async def test_an_end_that_leaves_nothing_queued_asks_the_backend_for_no_lease(
    backend_url: str,
) -> None:
    """One at a time, with a pause between (the worker's loop is idle when each ends), every
    start runs here: once a lease call has found the queue drained, an end does not lease
    again (it was a call per execution, a transaction or a round trip)."""
    engine = ss.Engine(backend_url, workers=1, poll_interval=3600)
    _steps(engine)
    async with engine:
        backend = engine._backend
        assert backend.leases_in_commit
        calls = 0
        lease = backend.lease

        async def counted(*args: object, **kwargs: object) -> list[Lease]:
            nonlocal calls
            calls += 1
            return await lease(*args, **kwargs)  # type: ignore[arg-type]

        backend.lease = counted  # type: ignore[method-assign]
        for value in range(10):
            handle = await engine.start("ls.echo", {"value": value})
            assert await handle.result(timeout=30) == {"value": value}
            await anyio.sleep(0.02)
        assert calls <= 1  # the first end's, which finds the queue drained


async def test_a_refused_local_start_gives_its_slot_back(backend_url: str) -> None:
    engine = ss.Engine(backend_url, workers=1, poll_interval=0.01)
    _steps(engine)
    async with engine:
        handle = await engine.start("ls.echo", {"value": 1})
        assert await handle.result(timeout=30) == {"value": 1}
        with pytest.raises(ss.VersionConflictError):
            await engine.start("ls.echo", {"value": 2}, execution_id=handle.execution_id)
        with pytest.raises(ss.InputValidationError):
            await engine.start("ls.echo", {"value": "not a number"})
        # the only slot is free again: a new start runs
        again = await engine.start("ls.echo", {"value": 3})
        assert await again.result(timeout=30) == {"value": 3}
    assert await engine.state_of(handle.execution_id) == {"seen": 1}


async def test_a_failure_ending_here_reaches_the_handle(backend_url: str) -> None:
    engine = ss.Engine(backend_url, workers=2, poll_interval=0.01)

    @engine.step("ls.boom")
    async def boom(ctx: ss.StepContext) -> None:
        raise ValueError("boom")

    async with engine:
        handles = [await engine.start("ls.boom") for _ in range(3)]
        for handle in handles:
            with pytest.raises(ss.StepFailedError, match="boom"):
                await handle.result(timeout=30)
