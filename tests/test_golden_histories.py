"""Golden histories of the example steps, recorded once and replayed against today's code:
a change that would break the replay of executions already in a log fails here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import stepsource as ss
from stepsource import demo
from stepsource.testing import ReplayMismatch, replay_history, save_history

pytestmark = pytest.mark.anyio

HISTORIES = Path(__file__).parent / "golden" / "histories"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"golden_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def engine_with_everything() -> ss.Engine:
    engine = ss.Engine("memory://", poll_interval=0.01)
    demo.register(engine)
    example("order_fulfillment").register(engine)
    example("document_approval").register(engine)
    return engine


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "batch_processing": (demo.STEP_ID, {"items": demo.sample_items(), "batch_size": 10}),
    "order_success": ("orderFulfillment", {"orderId": "G1", "total": 10, "address": "a"}),
    "order_compensated": ("orderFulfillment", {"orderId": "G2", "total": 5000}),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_golden_history_replays_against_current_code(name: str) -> None:
    path = HISTORIES / f"{name}.json"
    engine = engine_with_everything()
    if os.environ.get("STEPSOURCE_REGENERATE_GOLDEN") or not path.exists():
        step_id, payload = CASES[name]
        async with engine:
            handle = await engine.start(step_id, payload)
            await handle.result(timeout=30)
        await save_history(engine, handle.execution_id, path)
    assert await replay_history(engine_with_everything(), path)


async def test_a_changed_handler_fails_the_golden_replay() -> None:
    changed = ss.Engine("memory://")

    @changed.step(demo.STEP_ID, version="1.0.0")
    async def process(ctx: ss.StepContext, items: list[Any], batch_size: int = 10) -> None:
        await ctx.set_state("status", "initializing")
        await ctx.create_checkpoint({"moved": "earlier"})  # the recorded code set progress here

    with pytest.raises(ReplayMismatch, match=r"was attempted where set_state\('progress'\)"):
        await replay_history(changed, HISTORIES / "batch_processing.json")
