"""The example programs in examples/ run, give the seed's outcomes, and survive crash_everywhere."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.testing import crash_everywhere

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_order_fulfillment_succeeds_or_compensates(backend_url: str) -> None:
    example = load("order_fulfillment")
    engine = ss.Engine(backend_url, poll_interval=0.01)
    example.register(engine)
    async with engine:
        ok = await engine.start(
            "orderFulfillment", {"orderId": "A1", "total": 120, "address": "1 Main St"}
        )
        declined = await engine.start("orderFulfillment", {"orderId": "A2", "total": 5000})
        no_address = await engine.start("orderFulfillment", {"orderId": "A3", "total": 10})
        assert await ok.result(timeout=20) == {
            "status": "success",
            "orderId": "A1",
            "reservation": "res-A1",
            "transactionId": "tx-A1",
            "shipment": "ship-A1",
        }
        failed: Any = await declined.result(timeout=20)
        unshippable: Any = await no_address.result(timeout=20)
    assert failed["reason"] == "payment declined"
    assert failed["compensated"] == ["reserveInventory"]
    assert unshippable["compensated"] == ["reserveInventory"]
    assert "no shipping address" in unshippable["reason"]
    assert (await engine.state_of(ok.execution_id))["orderStatus"] == "FULFILLED"
    assert (await engine.state_of(declined.execution_id))["orderStatus"] == "COMPENSATED"
    warehouse = engine._services.get("warehouse")
    assert warehouse.reserved == {"A1": 1}  # the failed orders' reservations were released


async def test_document_approval_waits_for_the_signal(backend_url: str) -> None:
    example = load("document_approval")
    engine = ss.Engine(backend_url, poll_interval=0.01)
    example.register(engine)
    async with engine:
        handle = await engine.start("documentApproval", {"documentId": "D1", "reviewerId": "R"})
        with anyio.fail_after(10):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.01)
        assert (await handle.query("getApprovalState"))["status"] == "PENDING"
        await handle.signal("approvalDecision", {"approved": False, "comment": "needs work"})
        result = await handle.result(timeout=10)
    assert result == {"documentId": "D1", "approved": False, "comments": [{"text": "needs work"}]}


async def test_batch_processing_runs_chunks_as_children(backend_url: str) -> None:
    example = load("batch_processing")
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=4)
    example.register(engine)
    items = list(range(-2, 40))
    async with engine:
        handle = await engine.start(
            "batchDataProcessing", {"batchId": "B1", "items": items, "chunkSize": 7}
        )
        result = await handle.result(timeout=30)
    assert result == {"batchId": "B1", "processed": 42, "successful": 40, "failed": 2}
    state = await engine.state_of(handle.execution_id)
    assert state["progress"] == {"processed": 42, "total": 42, "percentage": 100}
    assert len(await engine.executions(step_id="processChunk")) == 6
    checkpoints = await engine.checkpoints_of(handle.execution_id)
    assert [c.cursor for c in checkpoints] == [3, 6]


@pytest.mark.parametrize(
    ("name", "step", "payload"),
    [
        ("order_fulfillment", "orderFulfillment", {"orderId": "C1", "total": 50, "address": "a"}),
        ("order_fulfillment", "orderFulfillment", {"orderId": "C2", "total": 5000}),
        (
            "batch_processing",
            "batchDataProcessing",
            {"batchId": "C", "items": list(range(-1, 12)), "chunkSize": 4, "parallel": 2},
        ),
    ],
)
async def test_flow_examples_survive_a_crash_at_every_commit(
    name: str, step: str, payload: dict[str, object]
) -> None:
    engine = ss.Engine("memory://")
    load(name).register(engine)
    report = await crash_everywhere(engine, step, payload)
    assert report.boundaries_tried == report.commits - 1
    assert report.commits > 5
    assert report.crashes >= report.boundaries_tried // 2
