"""``cli_app_v1`` with ``cli.order`` deliberately changed (same id and version): it records
``set_state('subtotal')`` where v1 recorded ``set_state('total')``, so replaying an order
recorded by v1 diverges at that operation (version 7 of its stream)."""

from __future__ import annotations

from typing import Any

from cli_app_v1 import register_common

import stepsource as ss

engine = ss.Engine("memory://", workers=4, poll_interval=0.02)


@engine.step("cli.order", version="1.0.0")
async def order(ctx: ss.StepContext, items: list[int]) -> dict[str, Any]:
    await ctx.set_state("status", "pricing")
    total = await ctx.do("price", lambda: sum(items))
    await ctx.create_checkpoint({"priced": True}, cursor=len(items))
    await ctx.set_state("subtotal", total)  # the change
    ctx.add_history_entry("custom", {"total": total})
    await ctx.update_state({"status": "done"})
    return {"total": total}


register_common(engine)
