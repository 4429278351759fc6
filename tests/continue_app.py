"""Steps run by real ``stepsource worker continue_app:engine`` processes
(test_continue_as_new.py, test_schedules_process.py): a loop that continues as new, and the
target of a one-second schedule, which notes each run in a file so a test can count."""

from __future__ import annotations

import os
from pathlib import Path

import stepsource as ss

engine = ss.Engine(workers=4)


@engine.step("can.count")
async def count(ctx: ss.StepContext, n: int, total: int = 0, upto: int = 5) -> int:
    """Adds n, n+1, ... up to ``upto`` - 1, one number per run."""
    add: int = await ctx.do("add", lambda: n)
    await ctx.set_state("total", total + add)
    if n + 1 < upto:
        await ctx.continue_as_new({"n": n + 1, "total": total + add, "upto": upto})
    return total + add


@engine.step("sched.tick")
async def tick(ctx: ss.StepContext, label: str = "") -> str:
    """One line per body run in $SCHED_APP_RUNS: the execution's id."""
    path = os.environ.get("SCHED_APP_RUNS")
    if path:

        def note() -> None:
            with Path(path).open("a") as out:
                out.write(f"{ctx.execution_id}\n")

        await ctx.do("note", note)
    return label


engine.enable_schedules()  # these workers run schedules too
