"""Commits at side-effect boundaries end where commits per operation end.

For random programs that mix deterministic operations (state, checkpoints, restores, history)
with boundaries (``ctx.do``, ``ctx.uuid4``, ``ctx.flush``), the default durability and
``durability="each"`` give the same outcome (output, state, history, checkpoints), and a worker
crashed as any operation begins — losing whatever was buffered — and resumed elsewhere ends
with that same outcome, never running a recorded ``ctx.do`` body again (``crash_everywhere``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.definitions import Durability
from stepsource.testing import crash_everywhere
from stepsource.testing.programs import register_program_step
from stepsource.testing.strategies import boundary_programs

pytestmark = pytest.mark.anyio

EXECUTION_ID = "00000000-0000-4000-8000-0000000d0a11"


async def outcome(program: list[list[Any]], durability: Durability) -> dict[str, Any]:
    engine = ss.Engine("memory://", durability=durability, worker_id="w", seed=b"seed")
    step = register_program_step(engine)
    async with engine:
        handle = await engine.start(step, {"program": program}, execution_id=EXECUTION_ID)
        output = await handle.result(timeout=30)
        events = await engine.events(EXECUTION_ID)
        return {
            "output": output,
            "state": await engine.state_of(EXECUTION_ID),
            "history": [(h.type, h.details) for h in await engine.history_of(EXECUTION_ID)],
            "checkpoints": [(c.id, c.state) for c in await engine.checkpoints_of(EXECUTION_ID)],
            "operations": [type(e).__name__ for e in events if isinstance(e, ev.Recorded)],
        }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=boundary_programs(max_size=10))
async def test_boundary_and_each_record_the_same_execution(program: list[list[Any]]) -> None:
    boundary = await outcome(program, "boundary")
    each = await outcome(program, "each")
    assert boundary == each


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=boundary_programs(max_size=8))
async def test_a_crash_at_any_operation_ends_as_the_uninterrupted_run(
    program: list[list[Any]],
) -> None:
    engine = ss.Engine("memory://")
    step = register_program_step(engine)
    report = await crash_everywhere(engine, step, {"program": program})
    assert report.operations_tried == report.operations
    for point in report.boundaries:
        # a recorded body never runs again; one killed before its record may
        assert all(name.startswith("do-") for name in point.bodies_rerun)
