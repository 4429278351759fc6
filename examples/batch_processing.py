"""Distributed batch processing: chunks of items run as parallel child steps,
the parent tracks progress in its state and checkpoints after every chunk.

Run it: ``python examples/batch_processing.py`` (uses ./stepsource.db).
"""

from __future__ import annotations

from typing import Any

import anyio

import stepsource as ss


def register(engine: ss.Engine) -> None:
    @engine.step("processChunk", version="1")
    async def process_chunk(ctx: ss.StepContext, items: list[int]) -> dict[str, Any]:
        results = [item * item for item in items if item >= 0]
        errors = [{"item": item, "error": "negative"} for item in items if item < 0]
        return {"results": results, "errors": errors}

    @engine.step("batchDataProcessing", version="1")
    async def batch(
        ctx: ss.StepContext,
        batchId: str,
        items: list[int],
        chunkSize: int = 10,
        parallel: int = 3,
    ) -> dict[str, Any]:
        await ctx.set_state(
            "processingState",
            {
                "batchId": batchId,
                "totalItems": len(items),
                "processedItems": 0,
                "results": [],
                "errors": [],
            },
        )
        chunks = [items[i : i + chunkSize] for i in range(0, len(items), chunkSize)]
        for start in range(0, len(chunks), parallel):
            group = chunks[start : start + parallel]
            children = [await ctx.start_step("processChunk", {"items": c}) for c in group]
            state = await ctx.get_state("processingState")
            for chunk, child in zip(group, children, strict=True):
                outcome = await child.result()
                state["processedItems"] += len(chunk)
                state["results"] += outcome["results"]
                state["errors"] += outcome["errors"]
            await ctx.set_state("processingState", state)
            await ctx.set_state(
                "progress",
                {
                    "processed": state["processedItems"],
                    "total": len(items),
                    "percentage": round(state["processedItems"] * 100 / max(len(items), 1)),
                },
            )
            await ctx.create_checkpoint(
                {"chunksDone": start + len(group)},
                cursor=start + len(group),
                items_processed=state["processedItems"],
            )
        final = await ctx.get_state("processingState")
        return {
            "batchId": batchId,
            "processed": final["processedItems"],
            "successful": len(final["results"]),
            "failed": len(final["errors"]),
        }


async def main() -> None:
    engine = ss.Engine()
    register(engine)
    async with engine:
        handle = await engine.start(
            "batchDataProcessing", {"batchId": "B1", "items": list(range(-2, 40))}
        )
        print(await handle.result())


if __name__ == "__main__":
    anyio.run(main)
