"""Steps the web UI's tests look at: one that records several kinds of events, one that waits
for a signal, one whose state holds markup, and a small DAG."""

from __future__ import annotations

import functools
from typing import Any

import stepsource as ss

#: a state value a page must show as text, never run
INJECTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def tenfold(value: int) -> int:
    return value * 10


def make_engine(url: str, *, workers: int = 2) -> ss.Engine:
    engine = ss.Engine(url, workers=workers, poll_interval=0.02)

    @engine.step("ui.batch")
    async def batch(ctx: ss.StepContext, items: list[int]) -> dict[str, Any]:
        await ctx.set_state("phase", "loading")
        ctx.add_history_entry("custom", {"note": "loaded"})
        total = 0
        for index, item in enumerate(items):
            total += await ctx.do(f"add-{index}", functools.partial(tenfold, item))
            await ctx.update_state({"done": index + 1, "total": total})
            if index == 1:
                await ctx.create_checkpoint({"at": index}, cursor=index)
        await ctx.delete_state("phase")
        await ctx.set_state("result", {"total": total, "items": len(items)})
        return {"total": total}

    @engine.step("ui.approval")
    async def approval(ctx: ss.StepContext) -> dict[str, Any]:
        await ctx.set_state("decision", None)

        async def decide(payload: Any) -> None:
            await ctx.set_state("decision", payload)

        async def decided() -> bool:
            return await ctx.get_state("decision") is not None

        ctx.on_signal("decide", decide)
        await ctx.wait_for_condition(decided)
        return {"decision": await ctx.get_state("decision")}

    @engine.step("ui.markup")
    async def markup(ctx: ss.StepContext) -> str:
        await ctx.set_state("html", INJECTION)
        return INJECTION

    @engine.step("ui.node")
    async def node(ctx: ss.StepContext, n: int) -> int:
        return n + 1

    engine.dag(
        "ui.flow",
        {
            "first": ss.Node("ui.node"),
            "left": ss.Node("ui.node", depends_on=["first"]),
            "right": ss.Node("ui.node", depends_on=["first"]),
            "last": ss.Node("ui.node", depends_on=["left", "right"]),
        },
    )
    return engine
