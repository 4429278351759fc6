"""``engine.fork(execution_id, at_version)``: a new execution whose log starts as a prefix of
another's, then runs the current handler code on from there."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

import stepsource as ss
from stepsource.engine.forking import FORKED_FROM

pytestmark = pytest.mark.anyio

DEADLINE = 30


def make(url: str, bonus: int) -> ss.Engine:
    """The step as deployed: ``bonus`` changes what it does after its first two writes."""
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("fork.order")
    async def order(ctx: ss.StepContext, amount: int) -> dict[str, Any]:
        await ctx.set_state("amount", amount)
        await ctx.set_state("status", "priced")
        await ctx.flush()  # each write its own commit: versions to fork from
        total = await ctx.do("total", lambda: amount + bonus)
        await ctx.set_state("total", total)
        return {"total": total}

    return engine


def shape(events: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    skip = ("originator_id", "originator_version", "timestamp", "headers")
    return [(type(e).__name__, {k: v for k, v in vars(e).items() if k not in skip}) for e in events]


async def test_a_fork_replays_the_prefix_and_runs_the_current_code_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    original = make(url, bonus=1)
    async with original:
        source = await original.start("fork.order", {"amount": 10})
        assert await source.result(timeout=DEADLINE) == {"total": 11}
    events = await original.events(source.execution_id)
    priced = next(
        e.originator_version
        for e in events
        if type(e).__name__ == "StateSet" and getattr(e, "key", "") == "status"
    )
    fixed = make(url, bonus=100)  # the code changed since: the fork runs the new code
    async with fixed:
        fork = await fixed.fork(source.execution_id, priced)
        assert fork.execution_id != source.execution_id
        assert await fork.result(timeout=DEADLINE) == {"total": 110}
    forked = await fixed.events(fork.execution_id)
    assert shape(forked[:priced]) == shape(events[:priced])  # the prefix, as it was
    assert forked[0].headers == {FORKED_FROM: f"{source.execution_id}@{priced}"}  # type: ignore[attr-defined]
    assert await fixed.state_of(fork.execution_id, at_version=priced) == await fixed.state_of(
        source.execution_id, at_version=priced
    )
    assert await fixed.state_of(fork.execution_id) == {
        "amount": 10,
        "status": "priced",
        "total": 110,
    }
    assert await fixed.state_of(source.execution_id) == {
        "amount": 10,
        "status": "priced",
        "total": 11,
    }  # the source is untouched
    await fixed.aclose()


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (0, "at_version must be an int from 1 to 2\\*\\*63-1, not 0"),
        (10**6, "there is no version"),
        (-1, "from 1"),
        (2**70, "from 1 to 2\\*\\*63-1, not 1.18e\\+21"),
        (True, "not True"),
    ],
)
async def test_a_fork_from_a_version_the_execution_does_not_have_is_refused(
    version: int, message: str
) -> None:
    engine = make("memory://", bonus=1)
    async with engine:
        handle = await engine.start("fork.order", {"amount": 1})
        await handle.result(timeout=DEADLINE)
        with pytest.raises(ss.UsageError, match=message):
            await engine.fork(handle.execution_id, version)
        last = len(await engine.events(handle.execution_id))
        with pytest.raises(ss.UsageError, match="ends the execution"):
            await engine.fork(handle.execution_id, last)
        assert len(await engine.executions()) == 1  # nothing was stored


def test_the_web_ui_forks_from_the_version_shown(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def finished() -> str:
        engine = make(url, bonus=1)
        async with engine:
            handle = await engine.start("fork.order", {"amount": 5})
            await handle.result(timeout=DEADLINE)
        return handle.execution_id

    execution_id = anyio.run(finished)
    app = ss.Engine(url, workers=0).ui_app(read_only=False)
    with TestClient(app, follow_redirects=False) as http:
        page = http.get(f"/e/{execution_id}/versions?v=3").text
        assert "Fork from version 3" in page
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token is not None
        moved = http.post(
            f"/e/{execution_id}/fork", data={"version": "3", "csrf_token": token.group(1)}
        )
        assert moved.status_code == 303
        fork_id = moved.headers["location"].split("/e/")[1].split("?")[0]
        assert fork_id != execution_id

    async def forked() -> list[str]:
        engine = ss.Engine(url, workers=0)
        events = await engine.events(fork_id)
        await engine.aclose()
        return [type(e).__name__ for e in events]

    assert anyio.run(forked) == ["StepScheduled", "StepLeased", "StepStarted"]


def test_the_web_ui_verifies_an_execution_against_the_code_it_serves(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def finished() -> str:
        engine = make(url, bonus=1)
        async with engine:
            handle = await engine.start("fork.order", {"amount": 5})
            await handle.result(timeout=DEADLINE)
        return handle.execution_id

    execution_id = anyio.run(finished)
    without_code = ss.Engine(url, workers=0).ui_app()
    with TestClient(without_code, follow_redirects=False) as http:
        assert "Verify against the code" not in http.get(f"/e/{execution_id}").text
    for app_engine, expected in (
        (make(url, bonus=1), "verified: the handler code replays the record exactly"),
        (make(url, bonus=1).derive(workers=0), "verified"),
    ):
        with TestClient(app_engine.ui_app(), follow_redirects=True) as http:
            assert "Verify against the code" in http.get(f"/e/{execution_id}").text
            assert expected in http.get(f"/e/{execution_id}/verify").text

    def diverging(url: str) -> ss.Engine:
        engine = ss.Engine(url, workers=0)

        @engine.step("fork.order")
        async def order(ctx: ss.StepContext, amount: int) -> dict[str, Any]:
            await ctx.set_state("status", "priced")  # the code changed its first operation
            return {"total": amount}

        return engine

    with TestClient(diverging(url).ui_app(), follow_redirects=True) as http:
        page = http.get(f"/e/{execution_id}/verify").text
        assert "divergence:" in page
        assert "set_state(&#39;status&#39;) was attempted where set_state(&#39;amount&#39;)" in page
