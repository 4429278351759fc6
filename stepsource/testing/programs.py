"""A step that interprets operation programs (``strategies.operation_programs()``).

``register_program_step(engine)`` defines a step whose input is a program — a list of
``[name, *args]`` context operations — so property tests can run random sequences of real
context operations through a real worker and compare the log with a model.
"""

from __future__ import annotations

import functools
from typing import Any

from stepsource.engine.context import StepContext
from stepsource.engine.engine import Engine

__all__ = ["PROGRAM_STEP", "register_program_step", "run_program_operations"]


def _identity(value: Any) -> Any:
    return value


PROGRAM_STEP = "stepsource.testing.program"


async def run_program_operations(ctx: StepContext, program: list[list[Any]]) -> list[str]:
    """Perform each operation; ``restore`` picks among the checkpoints made so far (skipped
    when there are none). Returns the checkpoint ids.

    Besides the deterministic operations, ``do`` runs a sub-step returning its argument and
    ``uuid4`` draws a recorded UUID (each then writes what it got into the state), and
    ``flush`` commits what is buffered: the boundaries of ``durability="boundary"``.
    """
    ids: list[str] = []
    for index, (name, *args) in enumerate(program):
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
        elif name == "do":
            result = await ctx.do(f"do-{index}", functools.partial(_identity, args[0]))
            await ctx.set_state(f"do-{index}", result)
        elif name == "uuid4":
            await ctx.set_state(f"uuid-{index}", str(await ctx.uuid4()))
        elif name == "flush":
            await ctx.flush()
    return ids


def register_program_step(engine: Engine, step_id: str = PROGRAM_STEP) -> str:
    @engine.step(step_id)
    async def interpret(ctx: StepContext, program: list[list[Any]]) -> list[str]:
        return await run_program_operations(ctx, program)

    return step_id
