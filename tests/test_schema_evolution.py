"""Schema evolution. Inputs: an execution started before a required input field was added
resumes under the new handler through its ``migrate_input``, and fails with
InputValidationError without one; a new start's input is never migrated. Events: a log
stored with an event class's version-1 shape loads after the class moved to version 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.aggregates import events as ev
from stepsource.testing import SkippingClock

pytestmark = pytest.mark.anyio


def old_app(url: str, clock: SkippingClock, shared: MemoryBackend | None = None) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, clock=clock, backend=shared)

    @engine.step("shop.order", version="1")
    async def order(ctx: ss.StepContext, order_id: str) -> str:
        await ctx.sleep(3600)
        return order_id

    return engine


def new_app(
    url: str, clock: SkippingClock, *, migrate: bool, shared: MemoryBackend | None = None
) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, clock=clock, backend=shared)

    def add_currency(data: dict[str, Any]) -> dict[str, Any]:
        data.setdefault("currency", "EUR")  # orders before currencies were in euros
        return data

    @engine.step(
        "shop.order",
        version="2",
        compatible_with=("1",),
        migrate_input=add_currency if migrate else None,
    )
    async def order(ctx: ss.StepContext, order_id: str, currency: str) -> str:
        await ctx.sleep(3600)
        return f"{order_id} in {currency}"

    return engine


async def started_and_suspended(
    url: str, clock: SkippingClock, shared: MemoryBackend | None = None
) -> str:
    old = old_app(url, clock, shared)
    async with old:
        handle = await old.start("shop.order", {"order_id": "o-1"})
        with anyio.fail_after(10):
            while "StepSuspended" not in [
                type(e).__name__ for e in await old.events(handle.execution_id)
            ]:
                await anyio.sleep(0.01)
    return handle.execution_id


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_an_execution_started_before_a_required_field_resumes_migrated(
    backend: str, tmp_path: Path
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'shop.db'}"
    clock = SkippingClock(auto=False)
    shared = MemoryBackend() if backend == "memory" else None  # the deploys share one log
    execution_id = await started_and_suspended(url, clock, shared)
    clock.skip(3601)
    new = new_app(url, clock, migrate=True, shared=shared)
    async with new:
        out = await new.get_handle(execution_id).result(timeout=10)
        assert out == "o-1 in EUR"
        with pytest.raises(ss.InputValidationError):  # a new start is not migrated
            await new.start("shop.order", {"order_id": "o-2"})


async def test_without_a_migration_the_old_input_fails_naming_the_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shop.db'}"
    clock = SkippingClock(auto=False)
    execution_id = await started_and_suspended(url, clock)
    clock.skip(3601)
    new = new_app(url, clock, migrate=False)
    async with new:
        with pytest.raises(ss.StepFailedError) as raised:
            await new.get_handle(execution_id).result(timeout=10)
    assert "currency" in str(raised.value)


async def test_a_log_written_with_version_1_event_classes_loads_after_the_class_moved(
    tmp_path: Path,
) -> None:
    """SubStepCompleted moved to class version 2 (``body_started_ms``): a SQLite log whose
    sub-step result was stored in the version-1 shape (no class_version, no new field, as
    an older release wrote it, before checksums) reads through ``upcast_v1_v2``."""
    path = tmp_path / "old.db"
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.01)

    @engine.step("shop.price")
    async def price(ctx: ss.StepContext) -> int:
        return int(await ctx.do("sum", lambda: 42))

    async with engine:
        handle = await engine.start("shop.price")
        assert await handle.result(timeout=10) == 42
    with sqlite3.connect(path) as db:
        stream = db.execute(
            "SELECT version, topic, data FROM events WHERE stream_id = ?",
            (handle.execution_id,),
        ).fetchall()
        rewritten = 0
        for version, topic, data in stream:
            state = orjson.loads(data)
            state.pop("_c", None)  # the whole stream unchecked, as an older release wrote it
            if topic == "stepsource:SubStepCompleted":
                assert state.pop("class_version") == 2
                del state["body_started_ms"]
                rewritten += 1
            db.execute(
                "UPDATE events SET data = ? WHERE stream_id = ? AND version = ?",
                (orjson.dumps(state), handle.execution_id, version),
            )
        assert rewritten == 1
    reader = ss.Engine(f"sqlite:///{path}", workers=0)
    events = await reader.events(handle.execution_id)
    (done,) = [e for e in events if isinstance(e, ev.SubStepCompleted)]
    assert (done.name, done.value, done.body_started_ms) == ("sum", 42, None)
    assert await reader.get_handle(handle.execution_id).result(timeout=5) == 42
