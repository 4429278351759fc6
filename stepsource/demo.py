"""The complete batch-processing example: items processed in batches with checkpoint-based recovery.

``register(engine)`` defines the step ``data.processing.withRecovery`` and its item-processor
service on an engine; ``sample_items()`` gives the fixed input the demo and the tests use:
25 items in batches of 10, item 7 fails on its own (counted, processing goes on) and item 14
breaks its whole batch, which restores the batch's checkpoint and reprocesses it the
alternative way. ``stepsource demo`` runs it on the embedded SQLite default.
"""

from __future__ import annotations

from typing import Any

import pydantic

from stepsource.engine.context import StepContext
from stepsource.engine.engine import Engine

__all__ = [
    "STEP_ID",
    "BatchError",
    "Item",
    "ItemError",
    "ItemProcessor",
    "Summary",
    "register",
    "sample_items",
]

STEP_ID = "data.processing.withRecovery"


class Item(pydantic.BaseModel):
    id: str
    value: int
    kind: str = "normal"


class Summary(pydantic.BaseModel):
    totalItems: int
    processedCount: int
    failedCount: int
    results: list[dict[str, Any]]


class ItemError(Exception):
    """One item cannot be processed; the batch goes on."""


class BatchError(Exception):
    """The batch cannot go on the normal way (e.g. an upstream system is down)."""


class ItemProcessor:
    """The service the step looks up with ``ctx.get_service("itemProcessor")``."""

    async def process(self, item: Item) -> dict[str, Any]:
        if item.kind == "poison":
            raise BatchError(f"upstream rejected the batch at item {item.id}")
        if item.value < 0:
            raise ItemError(f"item {item.id} has a negative value")
        return {"doubled": item.value * 2}

    async def process_alternative(self, item: Item) -> dict[str, Any]:
        if item.kind == "poison" or item.value < 0:
            raise ItemError(f"item {item.id} skipped by the fallback processor")
        return {"doubled": item.value * 2, "via": "fallback"}


def sample_items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for n in range(1, 26):
        item: dict[str, Any] = {"id": f"item-{n}", "value": n}
        if n == 7:
            item["value"] = -7
        if n == 14:
            item["kind"] = "poison"
        items.append(item)
    return items


def register(engine: Engine) -> None:
    """Register the batch-processing step and its service on ``engine``."""
    engine.register_service("itemProcessor", factory=ItemProcessor)

    @engine.step(
        STEP_ID,
        version="1.0.0",
        display_name="Batch processing with recovery",
        description="Processes data with checkpoint-based recovery",
    )
    async def process_data_with_recovery(
        ctx: StepContext, items: list[Item], batch_size: int = 10
    ) -> Summary:
        processor: ItemProcessor = ctx.get_service("itemProcessor")
        processed_count = 0
        failed_count = 0
        results: list[dict[str, Any]] = []

        await ctx.set_state("status", "initializing")
        await ctx.set_state("progress", 0)
        ctx.log("Starting batch processing", totalItems=len(items), batchSize=batch_size)

        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            progress = (i * 100) // len(items)
            checkpoint_id = await ctx.create_checkpoint(
                {"batchIndex": i, "progress": progress},
                cursor=i,
                items_processed=processed_count + failed_count,
                accumulated_results={
                    "processedCount": processed_count,
                    "failedCount": failed_count,
                },
            )
            await ctx.update_state(
                {
                    "status": "processing",
                    "batchIndex": i,
                    "progress": progress,
                    "processedCount": processed_count,
                    "failedCount": failed_count,
                }
            )
            batch_results: list[dict[str, Any]] = []
            try:
                for item in batch:
                    try:
                        result = await processor.process(item)
                        batch_results.append({"id": item.id, "success": True, "result": result})
                    except ItemError as item_error:
                        batch_results.append(
                            {"id": item.id, "success": False, "error": str(item_error)}
                        )
                        ctx.log("Item processing failed", itemId=item.id, error=str(item_error))
                    await ctx.set_state("lastItemId", item.id)
            except BatchError as batch_error:
                ctx.log(
                    "Batch processing failed, restoring from checkpoint",
                    error=str(batch_error),
                    checkpointId=checkpoint_id,
                )
                await ctx.restore_from_checkpoint(checkpoint_id)
                ctx.add_history_entry(
                    "custom",
                    {"operation": "batch_recovery", "batchIndex": i, "error": str(batch_error)},
                )
                batch_results = []
                for item in batch:
                    try:
                        result = await processor.process_alternative(item)
                        batch_results.append({"id": item.id, "success": True, "result": result})
                    except ItemError as item_error:
                        batch_results.append(
                            {"id": item.id, "success": False, "error": str(item_error)}
                        )
            results.extend(batch_results)
            processed_count += sum(1 for r in batch_results if r["success"])
            failed_count += sum(1 for r in batch_results if not r["success"])

        await ctx.update_state(
            {
                "status": "completed",
                "progress": 100,
                "processedCount": processed_count,
                "failedCount": failed_count,
            }
        )
        await ctx.complete(
            {
                "status": "success" if failed_count == 0 else "partial",
                "processedCount": processed_count,
                "failedCount": failed_count,
            }
        )
        return Summary(
            totalItems=len(items),
            processedCount=processed_count,
            failedCount=failed_count,
            results=results,
        )
