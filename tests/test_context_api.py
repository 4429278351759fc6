"""The StepContext surface: identity, metadata, inputs, config, services, state, history."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import anyio
import pydantic
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


async def test_info_metadata_inputs_and_config(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, worker_id="worker-7")
    seen: dict[str, Any] = {}

    @engine.step(
        "ctx.surface",
        version="2.1.0",
        display_name="Surface",
        description="reads everything",
        priority=3,
        config={"api_url": "http://127.0.0.1:9/api", "batch": 5},
    )
    async def handler(ctx: ss.StepContext, order_id: str, batch_size: int = 100) -> str:
        seen["info"] = ctx.info
        seen["meta"] = ctx.step_metadata
        seen["exec"] = ctx.execution_metadata
        seen["inputs"] = (
            ctx.get_input("order_id"),
            ctx.get_input("missing"),
            ctx.get_input_or("batch_size", 100),
            ctx.get_input_or("note", "default"),
            ctx.input_data,
        )
        seen["config"] = (ctx.get_config("api_url"), ctx.get_config("nope"), ctx.step_config)
        seen["ids"] = (ctx.task_uuid, ctx.step_uuid, ctx.correlation_id)
        seen["args"] = (order_id, batch_size)
        return order_id

    async with engine:
        handle = await engine.start(
            "ctx.surface", {"order_id": "o-1", "note": "hi"}, correlation_id="corr-9"
        )
        await handle.result(timeout=10)
    eid = handle.execution_id
    info = seen["info"]
    assert (info.step_id, info.execution_id, info.attempt_number) == ("ctx.surface", eid, 1)
    assert (info.correlation_id, info.worker_id, info.priority) == ("corr-9", "worker-7", 3)
    assert info.flow_id is None
    assert info.parent_execution_id is None
    assert seen["meta"] == ss.StepMetadata(
        id="ctx.surface", version="2.1.0", display_name="Surface", description="reads everything"
    )
    assert seen["exec"].status == "executing"
    assert seen["exec"].succeeded is None
    assert seen["exec"].started_at.tzinfo is not None
    assert seen["inputs"] == ("o-1", None, 100, "hi", {"order_id": "o-1", "note": "hi"})
    config = {"api_url": "http://127.0.0.1:9/api", "batch": 5}
    assert seen["config"] == ("http://127.0.0.1:9/api", None, config)
    assert seen["ids"] == (eid, eid, "corr-9")
    assert seen["args"] == ("o-1", 100)
    record = await engine.describe(eid)
    assert record.step_definition_snapshot["config"] == config
    assert record.step_version == "2.1.0"
    assert record.correlation_id == "corr-9"


async def test_state_operations_and_the_state_object(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("ctx.state")
    async def handler(ctx: ss.StepContext) -> dict[str, Any]:
        assert await ctx.get_state("counter") is None
        assert await ctx.get_state("counter", 0) == 0
        await ctx.set_state("counter", 5)
        await ctx.update_state({"status": "processing", "counter": 10, "tags": ("a", "b")})
        obj = await ctx.get_state_object()
        obj["counter"] = 999  # a copy: changing it changes nothing recorded
        await ctx.delete_state("status")
        await ctx.delete_state("never-set")
        return await ctx.get_state_object()

    async with engine:
        handle = await engine.start("ctx.state")
        assert await handle.result(timeout=10) == {"counter": 10, "tags": ["a", "b"]}
    assert await engine.state_of(handle.execution_id) == {"counter": 10, "tags": ["a", "b"]}
    types = [e.type for e in await engine.history_of(handle.execution_id)]
    assert types == [
        "started",
        "state-set",
        "state-set",
        "state-deleted",
        "state-deleted",
        "completed",
    ]


async def test_checkpoint_api(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("ctx.checkpoints")
    async def handler(ctx: ss.StepContext) -> list[str]:
        await ctx.set_state("progress", 10)
        first = await ctx.create_checkpoint({"reason": "Before network operation"})
        await ctx.set_state("lastCheckpointId", first)
        await ctx.set_state("progress", 50)
        second = await ctx.create_checkpoint(cursor={"page": 2}, items_processed=50)
        info = await ctx.get_checkpoint_info(first)
        assert info.state == {"progress": 10}
        assert info.metadata == {"reason": "Before network operation"}
        assert ctx.checkpoint is not None
        assert ctx.checkpoint.id == second
        await ctx.restore_from_checkpoint(first)
        assert await ctx.get_state_object() == {"progress": 10}
        # the latest checkpoint is the last one created, not the one restored
        assert ctx.checkpoint_cursor == {"page": 2}
        with pytest.raises(ss.UnknownCheckpointError):
            await ctx.get_checkpoint_info("nope")
        return [c.id for c in await ctx.get_all_checkpoints()]

    async with engine:
        handle = await engine.start("ctx.checkpoints")
        ids = await handle.result(timeout=10)
    checkpoints = await engine.checkpoints_of(handle.execution_id)
    assert [c.id for c in checkpoints] == ids
    assert checkpoints[1].state == {"progress": 50, "lastCheckpointId": ids[0]}
    assert checkpoints[1].items_processed == 50
    assert checkpoints[0].created_at.tzinfo == UTC
    assert await engine.state_of(handle.execution_id) == {"progress": 10}


async def test_history_entries_are_committed_with_the_next_await_or_at_the_end(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    gate = anyio.Event()
    paused = anyio.Event()

    @engine.step("ctx.history")
    async def handler(ctx: ss.StepContext) -> int:
        ctx.add_history_entry("custom", {"operation": "data_validation", "valid": 990})
        seen_locally = [e.type for e in ctx.history]
        assert seen_locally[-1] == "custom"
        paused.set()
        await gate.wait()
        await ctx.set_state("after", True)
        ctx.add_history_entry("audit", {"by": "tester"})
        return len(ctx.history)

    async with engine:
        handle = await engine.start("ctx.history")
        await paused.wait()
        before = [e.type for e in await engine.history_of(handle.execution_id)]
        gate.set()
        count = await handle.result(timeout=10)
    assert before == ["started"]  # not yet durable: committed with the next awaited operation
    entries = await engine.history_of(handle.execution_id)
    assert [e.type for e in entries] == ["started", "custom", "state-set", "audit", "completed"]
    assert entries[1].details == {"operation": "data_validation", "valid": 990}
    assert count == 4


async def test_services_objects_and_lazy_factories(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    built: list[int] = []

    class Client:
        def get(self) -> str:
            return "payload"

    engine.register_service("httpClient", Client())

    def build_counter() -> int:
        built.append(1)
        return len(built)

    engine.register_service("counter", factory=build_counter)

    @engine.step("ctx.services")
    async def handler(ctx: ss.StepContext) -> list[Any]:
        with pytest.raises(ss.UnknownServiceError, match=r"ctx\.services"):
            ctx.get_service("missing")
        return [
            ctx.get_service("httpClient").get(),
            ctx.get_service("counter"),
            ctx.get_service("counter"),
        ]

    assert built == []  # factories are lazy
    async with engine:
        first = await (await engine.start("ctx.services")).result(timeout=10)
        second = await (await engine.start("ctx.services")).result(timeout=10)
    assert first == second == ["payload", 1, 1]
    assert built == [1]  # called once per engine


async def test_read_objects_are_frozen_and_use_the_pinned_time_types(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("ctx.frozen")
    async def handler(ctx: ss.StepContext) -> None:
        await ctx.create_checkpoint({"a": 1})

    async with engine:
        handle = await engine.start("ctx.frozen")
        await handle.result(timeout=10)
    eid = handle.execution_id
    entry = (await engine.history_of(eid))[0]
    checkpoint = (await engine.checkpoints_of(eid))[0]
    record = await engine.describe(eid)
    for obj, field in ((entry, "type"), (checkpoint, "id"), (record, "status")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, "changed")
    assert entry.timestamp.tzinfo == UTC
    assert isinstance(record.schedule, int)
    assert isinstance(record.updated, int)
    assert record.id == eid
    assert all(isinstance(a.polled, int) for a in record.executions)
    events = await engine.events(eid)
    assert [e.originator_version for e in events] == list(range(1, len(events) + 1))
    middle = await engine.events(eid, from_version=2, to_version=3)
    assert [e.originator_version for e in middle] == [2, 3]


async def test_recording_from_a_concurrent_task_outside_do_is_refused(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("ctx.concurrent")
    async def handler(ctx: ss.StepContext) -> str:
        await ctx.set_state("main", 1)
        errors: list[str] = []

        async def side() -> None:
            try:
                await ctx.set_state("side", 2)
            except ss.UsageError as error:
                errors.append(str(error))

        async with anyio.create_task_group() as tg:
            tg.start_soon(side)
        return errors[0]

    async with engine:
        handle = await engine.start("ctx.concurrent")
        message = await handle.result(timeout=10)
    assert isinstance(message, str)
    assert "concurrent task" in message
    assert await engine.state_of(handle.execution_id) == {"main": 1}


async def test_registration_errors_are_clear() -> None:
    engine = ss.Engine("memory://")

    @engine.step("reg.one")
    async def one(ctx: ss.StepContext) -> None:
        return None

    with pytest.raises(ss.UsageError, match="already registered"):
        engine.step("reg.one")(one)

    def generator(ctx: ss.StepContext) -> Iterator[int]:
        yield 1

    with pytest.raises(ss.UsageError, match="an async def or a plain def function"):
        engine.step("reg.generator")(generator)

    async def star(ctx: ss.StepContext, *args: int) -> None:
        return None

    with pytest.raises(ss.UsageError, match=r"\*args"):
        engine.step("reg.star")(star)

    class Order(pydantic.BaseModel):
        order_id: str

    async def forgot_ctx(order_id: str, amount: int) -> None:
        return None

    async def forgot_ctx_model(order: Order) -> None:
        return None

    # the context was forgotten: the first input would receive it and the step run with it
    with pytest.raises(ss.UsageError, match=r"takes order_id: str first, where the StepContext"):
        engine.step("reg.forgot")(forgot_ctx)
    with pytest.raises(ss.UsageError, match=r"takes order: Order first"):
        engine.step("reg.forgot_model")(forgot_ctx_model)
    assert "reg.forgot" not in engine.step_ids()

    async def untyped(context, order_id: str) -> None:  # type: ignore[no-untyped-def]
        return None

    engine.step("reg.untyped_context")(untyped)  # any name, no annotation: still the context


async def test_a_step_registered_while_the_engine_runs_is_refused(tmp_path: Path) -> None:
    """Its workers lease the steps registered at start: a later one would be started and
    never run. A client engine (no workers) may still learn a step's input schema."""
    engine = ss.Engine(f"sqlite:///{tmp_path / 'late.db'}", poll_interval=0.01)

    async def late(ctx: ss.StepContext) -> str:
        return "ran"

    async with engine:
        with pytest.raises(ss.UsageError, match="would not be served") as refused:
            engine.step("reg.late")(late)
        assert refused.value.step_id == "reg.late"
        assert "reg.late" not in engine.step_ids()
    engine.step("reg.late")(late)  # stopped: registered, and served from the next start
    async with engine:
        handle = await engine.start("reg.late")
        assert await handle.result(timeout=10) == "ran"
    client = ss.Engine(f"sqlite:///{tmp_path / 'late.db'}", workers=0)
    async with client:
        client.step("reg.late")(late)
    assert client.step_ids() == ["reg.late"]
