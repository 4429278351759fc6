"""engine.verify: the registered handler code re-run read-only against each recorded attempt.

Executions are recorded by the handlers of ``cli_app_v1`` on a SQLite file; other engines on
the same file, with changed handlers, verify them. A verification appends nothing and runs no
``ctx.do`` body.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import cli_app_v1  # noqa: E402
import cli_app_v2  # noqa: E402

pytestmark = pytest.mark.anyio
DEADLINE = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """Replay does not depend on the event loop beyond what the other suites cover."""
    return "asyncio"


async def record(url: str) -> dict[str, str]:
    """One order, one flaky (two attempts), one waiter (open attempt, suspended)."""
    engine = cli_app_v1.engine.derive(url=url, workers=4)
    async with engine:
        order = await engine.start("cli.order", {"items": [1, 2, 3]})
        flaky = await engine.start("cli.flaky", {"n": 4})
        waiter = await engine.start("cli.waiter", {"name": "go"})
        await order.result(timeout=DEADLINE)
        await flaky.result(timeout=DEADLINE)
        with anyio.fail_after(DEADLINE):
            while not await engine.executions(status="waiting"):
                await anyio.sleep(0.02)
    await engine.aclose()
    return {
        "order": order.execution_id,
        "flaky": flaky.execution_id,
        "waiter": waiter.execution_id,
    }


async def test_the_recording_code_verifies_every_attempt_and_appends_nothing(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    ids = await record(url)
    bodies: list[str] = []
    engine = cli_app_v1.engine.derive(url=url, workers=0)
    engine.on_substep_body = lambda _eid, name: bodies.append(name)
    end = await engine._backend.max_position()
    for execution_id in ids.values():
        assert await engine.verify(execution_id) is None
    flaky = await engine.replay(ids["flaky"])
    assert [a.attempt for a in flaky.attempts] == [1, 2]
    assert flaky.attempts[0].outcome.startswith("raised ConnectionError")
    assert flaky.attempts[1].outcome == "returned"
    assert all(a.matched == a.recorded for a in flaky.attempts)
    waiter = await engine.replay(ids["waiter"])
    assert waiter.attempts[-1].outcome == "reached the end of the record"  # still waiting
    assert await engine._backend.max_position() == end  # nothing appended
    assert bodies == []  # no ctx.do body ran
    await engine.aclose()


async def test_a_changed_handler_diverges_at_the_operation_it_changed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    ids = await record(url)
    changed = cli_app_v2.engine.derive(url=url, workers=0)
    divergence = await changed.verify(ids["order"])
    assert divergence is not None
    assert divergence.attempt == 1
    assert divergence.version == 7
    assert divergence.recorded == "set_state('total')"
    assert divergence.attempted == "set_state('subtotal')"
    assert "set_state('subtotal') was attempted where set_state('total') was recorded at " in str(
        divergence
    )
    assert await changed.verify(ids["order"], at_version=6) is None  # before the change
    assert await changed.verify(ids["flaky"]) is None  # the same code
    await changed.aclose()


async def test_code_that_stops_early_or_runs_another_version_diverges(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    ids = await record(url)

    early = ss.Engine(url, workers=0)

    @early.step("cli.order", version="1.0.0")
    async def order(ctx: ss.StepContext, items: list[int]) -> dict[str, Any]:
        await ctx.set_state("status", "pricing")
        return {"total": 0}

    divergence = await early.verify(ids["order"])
    assert divergence is not None
    assert divergence.recorded == "ctx.do('price')"
    assert "recorded at version 5 was never reached: the handler returned first" in str(divergence)

    newer = ss.Engine(url, workers=0)
    compatible = ss.Engine(url, workers=0)
    for target, compat in ((newer, ()), (compatible, ("1.0.0",))):
        target.step("cli.order", version="2.0.0", compatible_with=compat)(
            cli_app_v1.order  # the same code under a new version
        )
    divergence = await newer.verify(ids["order"])
    assert divergence is not None
    assert "compatible_with=('1.0.0',)" in divergence.message
    assert await compatible.verify(ids["order"]) is None

    with pytest.raises(ss.UnknownStepError):
        await early.verify(ids["flaky"])  # not registered on that engine
    with pytest.raises(ss.UnknownExecutionError):
        await early.verify("00000000-0000-4000-8000-000000000000")
    for engine in (early, newer, compatible):
        await engine.aclose()
