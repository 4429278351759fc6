"""Input migration: an execution started before a required input field was added resumes
under the new handler through its ``migrate_input``, and fails with InputValidationError
naming the fix without one; a new start's input is never migrated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
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
