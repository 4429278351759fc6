"""Steps the CLI tests run and replay (``stepsource replay/verify --app cli_app_v1:engine``).

``cli_app_v2`` registers the same step ids and versions with one handler deliberately
changed, so ``verify`` against it must find the divergence. The module is imported by the
test process (to run executions) and by ``stepsource`` subprocesses (PYTHONPATH=tests).
"""

from __future__ import annotations

from typing import Any

import stepsource as ss

#: the URL is overridden (``--url`` / ``derive``); constructing does no I/O
engine = ss.Engine("memory://", workers=4, poll_interval=0.02)


def register_common(target: ss.Engine) -> None:
    """The steps both versions of the app define the same way."""

    @target.step("cli.flaky", max_retries=1, retry=ss.RetryPolicy(initial=0.01))
    async def flaky(ctx: ss.StepContext, n: int) -> dict[str, Any]:
        await ctx.set_state("attempt", ctx.info.attempt_number)
        doubled = await ctx.do("double", lambda: n * 2)
        if not ctx.is_retry():
            raise ConnectionError("the first attempt always loses its connection")
        return {"doubled": doubled}

    @target.step("cli.waiter")
    async def waiter(ctx: ss.StepContext, name: str) -> dict[str, Any]:
        signals: list[Any] = []

        async def on_signal(payload: Any) -> None:
            signals.append(payload)
            await ctx.set_state("signals", list(signals))

        ctx.on_signal("nudge", on_signal)
        await ctx.set_state("waiting_for", name)
        payload = await ctx.wait_for_event(name)
        await ctx.set_state("received", payload)
        return {"received": payload, "signals": signals}


@engine.step("cli.order", version="1.0.0")
async def order(ctx: ss.StepContext, items: list[int]) -> dict[str, Any]:
    await ctx.set_state("status", "pricing")
    total = await ctx.do("price", lambda: sum(items))
    await ctx.create_checkpoint({"priced": True}, cursor=len(items))
    await ctx.set_state("total", total)
    ctx.add_history_entry("custom", {"total": total})
    await ctx.update_state({"status": "done"})
    return {"total": total}


register_common(engine)
