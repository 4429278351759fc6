"""Steps whose worker's log lines tests/test_worker_logs.py reads (PYTHONPATH=tests).

- ``log.flaky`` fails its first attempt and succeeds on the retry, logging through ctx.log.
- ``log.held`` logs through ctx.log, then (in a worker started with ``LOG_APP_HOLD=1``) waits
  forever inside a sub-step, so the test can kill that worker and watch another take over.
"""

from __future__ import annotations

import os

import anyio

import stepsource as ss

#: URL, worker count and lease are overridden by ``stepsource worker``; constructing does no I/O
engine = ss.Engine("memory://", workers=1, lease_seconds=1.0, poll_interval=0.05)


@engine.step("log.flaky", max_retries=1, retry=ss.RetryPolicy(initial=0.01))
async def flaky(ctx: ss.StepContext, n: int) -> dict[str, int]:
    ctx.log("flaky handler running", n=n, attempt=ctx.info.attempt_number)
    if not ctx.is_retry():
        raise ConnectionError("the first attempt always fails")
    return {"n": n}


@engine.step("log.held")
async def held(ctx: ss.StepContext) -> dict[str, bool]:
    ctx.log("held handler began")
    await ctx.now()  # recorded (and durable before the sub-step): a takeover replays it

    async def hold() -> bool:
        if os.environ.get("LOG_APP_HOLD"):
            await anyio.sleep_forever()
        return True

    released = await ctx.do("hold", hold)
    ctx.log("held handler released")
    return {"released": released}
