"""A step that interprets operation programs (``strategies.operation_programs()``).

``register_program_step(engine)`` defines a step whose input is a program — a list of
``[name, *args]`` context operations — so property tests can run random sequences of real
context operations through a real worker and compare the log with a model.
"""

from __future__ import annotations

from typing import Any

from stepsource.engine.context import StepContext
from stepsource.engine.engine import Engine

__all__ = ["PROGRAM_STEP", "register_program_step", "run_program_operations"]

PROGRAM_STEP = "stepsource.testing.program"


async def run_program_operations(ctx: StepContext, program: list[list[Any]]) -> list[str]:
    """Perform each operation; ``restore`` picks among the checkpoints made so far (skipped
    when there are none). Returns the checkpoint ids."""
    ids: list[str] = []
    for name, *args in program:
        if name == "set":
            await ctx.set_state(args[0], args[1])
        elif name == "update":
            await ctx.update_state(args[0])
        elif name == "delete":
            await ctx.delete_state(args[0])
        elif name == "checkpoint":
            ids.append(await ctx.create_checkpoint(args[0]))
        elif name == "restore" and ids:
            await ctx.restore_from_checkpoint(ids[args[0] % len(ids)])
        elif name == "history":
            ctx.add_history_entry(args[0], args[1])
    return ids


def register_program_step(engine: Engine, step_id: str = PROGRAM_STEP) -> str:
    @engine.step(step_id)
    async def interpret(ctx: StepContext, program: list[list[Any]]) -> list[str]:
        return await run_program_operations(ctx, program)

    return step_id
