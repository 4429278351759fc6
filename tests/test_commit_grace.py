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

from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.ports import Commit
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.aggregates import events as ev
from stepsource.engine import recorder

pytestmark = pytest.mark.anyio


class HangsOnce(SQLiteBackend):
    """A SQLite log whose first commit of a sub-step result hangs (nothing is written)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.hung = 0

    async def append(self, commit: Commit) -> int:
        if not self.hung and any(e.topic == ev.SubStepCompleted.TOPIC for e in commit.events):
            self.hung += 1
            await anyio.sleep(60)  # past the grace: the recorder's scope cancels the wait
        return await super().append(commit)


async def test_a_commit_past_the_grace_is_an_outage_not_a_handler_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "COMMIT_GRACE", 0.3)
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
