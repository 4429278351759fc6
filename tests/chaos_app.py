"""Steps run by the kill loop (test_chaos.py) in real ``stepsource worker chaos_app:engine``
processes that are SIGKILLed and restarted over and over.

``chaos.job`` mixes what a handler records: ``ctx.do`` sub-steps with a side effect, state
changes, checkpoints, a short durable ``ctx.sleep`` (the execution suspends and holds no
worker) and a child execution (``chaos.child``, itself one ``ctx.do`` and a state change).

Every ``ctx.do`` body appends two lines to the file named by the ``effects`` input, each with
one ``write`` on a file opened for appending (a SIGKILL loses neither, and lines from
different processes never interleave)::

    start <execution id> <sub-step name> <run id> <pid> <time_ns>
    end   <execution id> <sub-step name> <run id> <pid> <time_ns>

and returns ``{"value": ..., "run": <run id>}``, so the recorded ``SubStepCompleted`` names the
one body run whose result the log kept. The checker (chaos_checker.py) compares the runs with
the records: a body that started after its result was recorded is a ``ctx.do`` re-run.

The worker subprocesses import this module from the tests directory (on their PYTHONPATH); the
test process imports it too, to start executions with the same registrations.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import uuid
from typing import Any

import anyio

import stepsource as ss

__all__ = ["CHILD", "JOB", "engine", "expected_output"]

# the engine's warnings ("taken over", "lost the lease") go to the worker's stderr, where the
# test reads them to tell a worker that lost its lease (a zombie) from one that was killed
logging.basicConfig(
    level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)

#: URL, worker count and lease are overridden by ``stepsource worker``; constructing does no I/O
engine = ss.Engine("memory://", workers=4, lease_seconds=1.0, poll_interval=0.05)

JOB = "chaos.job"
CHILD = "chaos.child"
#: how long a body works between its two lines: a kill can land inside it
BODY_SECONDS = 0.02


def effect(path: str, line: str) -> None:
    """Append one line with a single write (atomic for a small line on a local file)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())
    finally:
        os.close(descriptor)


async def body(effects: str, execution_id: str, name: str, value: int) -> dict[str, Any]:
    """A sub-step body with a visible side effect; its result names this run."""
    run = uuid.uuid4().hex
    pid = os.getpid()
    effect(effects, f"start {execution_id} {name} {run} {pid} {time.time_ns()}")
    await anyio.sleep(BODY_SECONDS)
    effect(effects, f"end {execution_id} {name} {run} {pid} {time.time_ns()}")
    return {"value": value, "run": run}


def item_value(index: int, item: int) -> int:
    return (index * 10 + item) ** 2


@engine.step(JOB)
async def job(
    ctx: ss.StepContext, effects: str, index: int, items: int = 4, nap: float = 0.2
) -> dict[str, Any]:
    execution_id = ctx.execution_id
    total = 0
    for item in range(items):
        name = f"item-{item}"
        value = item_value(index, item)
        done = await ctx.do(name, functools.partial(body, effects, execution_id, name, value))
        total += int(done["value"])
        await ctx.update_state({"total": total, "done": item + 1})
        if item % 2 == 1:
            await ctx.create_checkpoint({"after": name}, cursor=item + 1, items_processed=item + 1)
        if item == 1:
            await ctx.sleep(nap)
    ctx.add_history_entry("custom", {"items": items})
    child = await ctx.run_step(CHILD, {"effects": effects, "index": index})
    await ctx.set_state("child", child)
    await ctx.complete({"items": items})
    return {"total": total, "child": child}


@engine.step(CHILD)
async def child(ctx: ss.StepContext, effects: str, index: int) -> dict[str, Any]:
    execution_id = ctx.execution_id
    work = functools.partial(body, effects, execution_id, "child-work", index)
    done = await ctx.do("child-work", work)
    await ctx.set_state("value", done["value"])
    return {"value": done["value"]}


def expected_output(index: int, items: int = 4) -> dict[str, Any]:
    """What ``chaos.job`` returns for ``index``, however often its worker was killed."""
    return {
        "total": sum(item_value(index, item) for item in range(items)),
        "child": {"value": index},
    }
