"""The batch-processing example with checkpoint recovery gives the committed outcome.

The fixed input has an item that fails on its own and a batch whose failure restores the
batch's checkpoint; the output, the history types, the checkpoints and the state over time
are compared with tests/golden/batch_example.json (ids and timestamps aside).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import stepsource as ss
from stepsource import demo

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden" / "batch_example.json"


async def run_batch_example(url: str) -> dict[str, Any]:
    engine = ss.Engine(url, poll_interval=0.02)
    demo.register(engine)
    async with engine:
        handle = await engine.start(demo.STEP_ID, {"items": demo.sample_items(), "batch_size": 10})
        output = await handle.result(timeout=30)
    eid = handle.execution_id
    checkpoints = await engine.checkpoints_of(eid)
    history = await engine.history_of(eid)
    record = await engine.describe(eid)
    return {
        "output": output,
        "history_types": [entry.type for entry in history],
        "custom_entries": [e.details for e in history if e.type == "custom"],
        "checkpoints": [
            {
                "version": cp.version,
                "metadata": cp.metadata,
                "cursor": cp.cursor,
                "items_processed": cp.items_processed,
                "accumulated_results": cp.accumulated_results,
                "state": cp.state,
            }
            for cp in checkpoints
        ],
        "state": await engine.state_of(eid),
        "state_at_second_checkpoint": await engine.state_of(eid, at_version=checkpoints[1].version),
        "completion": history[-1].details["details"],
        "status": record.status,
        "attempts": len(record.executions),
        "events": record.version,
    }


async def test_batch_example_gives_the_committed_outcome(backend_url: str) -> None:
    observed = await run_batch_example(backend_url)
    if os.environ.get("STEPSOURCE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(observed, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert observed == expected


async def test_batch_example_restore_puts_back_the_checkpoint_state(backend_url: str) -> None:
    observed = await run_batch_example(backend_url)
    second = observed["checkpoints"][1]
    # The batch that failed at item 14 had set lastItemId to item-13 before the restore;
    # after it the state is the checkpoint's again, and the fallback result counts.
    assert second["state"]["lastItemId"] == "item-10"
    assert observed["output"]["failedCount"] == 2
    assert observed["completion"] == {"status": "partial", "processedCount": 23, "failedCount": 2}
    assert [r["id"] for r in observed["output"]["results"]] == [f"item-{n}" for n in range(1, 26)]
