"""Steps whose runs go wrong in every way one execution can, run by real ``stepsource worker
isolation_app:engine`` processes (tests/test_isolation.py): each must end in a recorded
failure naming its cause while the worker goes on serving the others."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

import anyio

import stepsource as ss

logging.basicConfig(
    level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)

#: a small payload limit keeps the oversized values small
LIMIT = 20_000

engine = ss.Engine(
    "memory://", workers=1, lease_seconds=1.0, poll_interval=0.05, max_payload_bytes=LIMIT
)


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


@engine.step("iso.bad")
async def bad(ctx: ss.StepContext, kind: str) -> Any:
    if kind == "big-output":
        return "x" * (2 * LIMIT)
    if kind == "deep-output":
        return deep(1000)
    if kind == "big-details":
        await ctx.complete({"details": "x" * (2 * LIMIT)})
        return None
    if kind == "huge-message":
        raise ValueError("y" * (5 * 1024 * 1024))
    if kind == "surrogate-message":
        raise ValueError("half a pair: \ud800 here")
    if kind == "child-task":
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.set_state, "k", 1)
        return "returned"
    # BaseExceptions that are not Exceptions, raised by the handler's own code or a body's
    if kind == "sys-exit":  # sys.exit(), argparse on bad arguments...
        sys.exit("the handler called sys.exit")
    if kind == "own-cancelled":  # no cancellation of the task is under way
        raise asyncio.CancelledError("raised by the handler")
    if kind == "body-exit":  # in a body thread
        await ctx.do("exit", lambda: sys.exit("the body called sys.exit"))
    if kind == "body-cancelled":

        def cancelled_by_hand() -> None:
            raise asyncio.CancelledError("raised by the body")

        await ctx.do("cancelled", cancelled_by_hand)
    raise AssertionError(kind)


@engine.step("iso.ok")
async def ok(ctx: ss.StepContext, n: int) -> int:
    doubled: int = await ctx.do("double", lambda: n * 2)
    return doubled


@engine.step("iso.blocking")
async def blocking(ctx: ss.StepContext, effects: str, seconds: float) -> str:
    def body() -> str:
        with open(effects, "a") as out:  # one line per run of the body
            out.write(f"{os.getpid()}\n")
        time.sleep(seconds)  # blocks: a driver call, a CPU-bound loop
        return "slept"

    result: str = await ctx.do("sleep", body)
    return result


@engine.step("iso.stuck")
async def stuck(ctx: ss.StepContext, seconds: float) -> str:
    time.sleep(seconds)  # noqa: ASYNC251 - blocking code in an async handler, on purpose
    return "done"
