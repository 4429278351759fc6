"""Steps with flow-control limits, run by real worker processes in tests/test_flow_limits.py.

Each handler appends ``+ID KEY`` to a shared file as it begins and ``-ID KEY`` as it ends
(O_APPEND lines from every process interleave in time order), so the test can count how many
ran at once. The end line is written before the slot is given back: the observed count never
exceeds what the slots allowed.
"""

from __future__ import annotations

import os

import anyio

import stepsource as ss

engine = ss.Engine(workers=4, lease_seconds=1)


def _mark(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def _hold(ctx: ss.StepContext, path: str, key: str, seconds: float) -> str:
    _mark(path, f"+{ctx.info.execution_id} {key}")
    await anyio.sleep(seconds)
    _mark(path, f"-{ctx.info.execution_id} {key}")
    return key


@engine.step("flow.limited", concurrency=2)
async def limited(ctx: ss.StepContext, path: str, seconds: float = 0.3) -> str:
    return await _hold(ctx, path, "all", seconds)


@engine.step("flow.keyed", concurrency=1, concurrency_key="group")
async def keyed(ctx: ss.StepContext, path: str, group: str, seconds: float = 0.3) -> str:
    return await _hold(ctx, path, group, seconds)


@engine.step("flow.single", concurrency=1)
async def single(ctx: ss.StepContext, path: str, seconds: float = 0.1) -> str:
    return await _hold(ctx, path, "single", seconds)
