"""A commit the backend does not finish within the recorder's grace ends the attempt as a
backend outage, never as the handler's failure.

A commit is shielded from cancellation up to ``COMMIT_GRACE`` seconds; past it the recorder is
in doubt about what is stored. The kill loop on a NATS cluster found that this case ended in
an ``UnboundLocalError`` inside the handler's ``ctx.do``, which the engine recorded as the
handler's own failure and, after the retries, failed the execution for good. Here a backend
hangs on one commit past a shortened grace: the attempt ends without a recorded failure, and
the execution resumes by replay from what the log holds and completes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stepsource as ss
from stepsource.adapters.ports import Commit
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.aggregates import events as ev
from stepsource.engine import commit_grace

pytestmark = pytest.mark.anyio


class HangsOnce(SQLiteBackend):
    """A SQLite log whose first commit of a sub-step result hangs (nothing is written)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.hung = 0
        self.hanging = anyio.Event()

    async def append(self, commit: Commit) -> int:
        if not self.hung and any(e.topic == ev.SubStepCompleted.TOPIC for e in commit.events):
            self.hung += 1
            self.hanging.set()
            await anyio.sleep(60)  # past the grace: the recorder's scope cancels the wait
        return await super().append(commit)


async def test_a_commit_past_the_grace_is_an_outage_not_a_handler_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commit_grace, "COMMIT_GRACE", 0.3)
    backend = HangsOnce(str(tmp_path / "steps.db"))
    engine = ss.Engine(backend=backend, poll_interval=0.01, lease_seconds=0.5)
    runs: list[int] = []

    def fetch() -> int:
        runs.append(1)
        return len(runs)

    @engine.step("grace.job")
    async def job(ctx: ss.StepContext) -> Any:
        return {"value": await ctx.do("fetch", fetch)}

    async with engine:
        handle = await engine.start("grace.job")
        assert await handle.result(timeout=30) == {"value": 2}
    events = await engine.events(handle.execution_id)
    await engine.aclose()
    assert backend.hung == 1
    assert len(runs) == 2  # the body's result was never stored: it ran again
    names = [type(e).__name__ for e in events]
    assert "AttemptFailed" not in names, names
    assert names.count("SubStepCompleted") == 1
    assert isinstance(events[-1], ev.StepCompleted)


async def test_a_worker_stopping_during_a_hung_commit_stops_within_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the pool runs, one watcher bounds every commit; stopping the pool stops the
    watcher, and the commit it was bounding keeps its grace (the shutdown does not wait for
    the backend's 60 s)."""
    monkeypatch.setattr(commit_grace, "COMMIT_GRACE", 0.5)
    backend = HangsOnce(str(tmp_path / "steps.db"))
    engine = ss.Engine(backend=backend, poll_interval=0.01)

    @engine.step("grace.stop")
    async def job(ctx: ss.StepContext) -> Any:
        return await ctx.do("fetch", lambda: 1)

    with anyio.fail_after(20):  # the hang alone is 60 s
        async with engine:
            await engine.start("grace.stop")
            await backend.hanging.wait()
            assert engine._pool is not None
            grace = engine._pool.runtime.commit_grace
            assert (grace.watching, len(grace.open)) == (True, 1)
        assert (grace.watching, len(grace.open)) == (False, 0)
    await engine.aclose()


async def test_outside_a_running_pool_a_commit_scope_carries_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commit_grace, "COMMIT_GRACE", 0.2)
    grace = commit_grace.CommitGrace()
    with anyio.fail_after(5 * commit_grace.COMMIT_GRACE):
        with grace.scope() as scope:
            await anyio.sleep(3600)
    assert scope.cancelled_caught
    assert not grace.open


@given(
    ages=st.lists(st.floats(min_value=0.0, max_value=20.0, allow_nan=False), max_size=8),
)
def test_the_watcher_cancels_exactly_the_commits_older_than_the_grace(ages: list[float]) -> None:
    async def check() -> None:
        grace = commit_grace.CommitGrace()
        grace.watching = True  # as while its watch() runs
        now = 1000.0
        scopes = []
        for age in ages:
            scope = grace.scope()
            grace.open[scope] = now - age
            scopes.append(scope)
        grace.expire(now)
        for scope, age in zip(scopes, ages, strict=True):
            assert scope.cancel_called == (age >= commit_grace.COMMIT_GRACE)
            assert scope.deadline == math.inf  # no timer of its own while watched

    anyio.run(check)
