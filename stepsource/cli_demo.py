"""``stepsource demo``: run the batch-processing example and show what it recorded."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepsource.engine.engine import Engine

from .cli_inspect import print_history
from .cli_output import EXIT_OK, dumps, short

__all__ = ["demo"]


async def demo(url: str | None, console: Console) -> int:
    from stepsource import demo as example

    engine = Engine(url, workers=2, poll_interval=0.05)
    example.register(engine)
    where = engine.url or "sqlite:///stepsource.db"
    console.print(
        f"[bold]stepsource demo[/bold]: the batch-processing example (checkpoints, restores, "
        f"retries) on {escape(where)}"
    )
    async with engine:
        items = {"items": example.sample_items(), "batch_size": 10}
        handle = await engine.start(example.STEP_ID, items)
        console.print(f"started execution {handle.execution_id}")
        output = await handle.result(timeout=60)
    assert isinstance(output, dict)
    assert isinstance(output["results"], list)
    console.print(
        f"\n[bold]result[/bold]: totalItems={output['totalItems']} "
        f"processedCount={output['processedCount']} failedCount={output['failedCount']}"
    )
    for row in output["results"]:
        if isinstance(row, dict) and not row.get("success"):
            console.print(f"  failed: {row['id']}: {row['error']}")
    await print_history(engine, handle.execution_id, console)
    checkpoints = await engine.checkpoints_of(handle.execution_id)
    table = Table(title="checkpoints")
    for column in ("version", "id", "metadata", "cursor", "items", "accumulated results"):
        table.add_column(column)
    for cp in checkpoints:
        table.add_row(
            str(cp.version),
            cp.id[:8],
            short(cp.metadata),
            short(cp.cursor),
            str(cp.items_processed),
            short(cp.accumulated_results),
        )
    console.print(table)
    earlier = checkpoints[1].version if len(checkpoints) > 1 else 1
    console.print(f"\n[bold]state at version {earlier}[/bold] (time travel):")
    console.print(dumps(await engine.state_of(handle.execution_id, at_version=earlier)))
    console.print("[bold]state now[/bold]:")
    console.print(dumps(await engine.state_of(handle.execution_id)))
    record = await engine.describe(handle.execution_id)
    console.print(
        f"\nstatus={record.status} attempts={len(record.executions)} events={record.version}"
    )
    return EXIT_OK
