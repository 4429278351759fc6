"""Bad input is refused with a StepsourceError naming the execution and step, and nothing is
appended: each test reads the log afterwards to prove it."""

from __future__ import annotations

import math
from typing import Any

import pytest

import stepsource as ss
from stepsource.aggregates.events import StepScheduled

pytestmark = pytest.mark.anyio


class Opaque:
    pass


def make_engine(url: str) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, workers=2)

    @engine.step("bad.state")
    async def bad_state(ctx: ss.StepContext, value_kind: str) -> dict[str, Any]:
        values: dict[str, Any] = {
            "object": Opaque(),
            "nan": math.nan,
            "inf": {"x": [math.inf]},
            "set": {1, 2},
            "bytes": b"raw",
            "int-key": {1: "one"},
            "huge-int": 2**70,
        }
        before = len(await ctx.get_state_object())
        try:
            await ctx.set_state("k", values[value_kind])
        except ss.StateValueError as error:
            return {"error": str(error), "type": type(error).__name__, "before": before}
        return {"error": None}

    @engine.step("bad.checkpoint")
    async def bad_checkpoint(ctx: ss.StepContext) -> dict[str, Any]:
        await ctx.set_state("x", 1)
        try:
            await ctx.restore_from_checkpoint("no-such-checkpoint")
        except ss.UnknownCheckpointError as error:
            return {"error": str(error)}
        return {"error": None}

    @engine.step("typed.input")
    async def typed(ctx: ss.StepContext, count: int, name: str = "n") -> int:
        return count

    return engine


async def event_count(engine: ss.Engine, execution_id: str) -> int:
    return len(await engine.events(execution_id))


@pytest.mark.parametrize("kind", ["object", "nan", "inf", "set", "bytes", "int-key", "huge-int"])
async def test_non_json_state_value_is_refused_and_nothing_recorded(
    backend_url: str, kind: str
) -> None:
    engine = make_engine(backend_url)
    async with engine:
        handle = await engine.start("bad.state", {"value_kind": kind})
        result = await handle.result(timeout=10)
    assert isinstance(result, dict)
    assert result["type"] == "StateValueError"
    message = result["error"]
    assert isinstance(message, str)
    assert handle.execution_id in message
    assert "bad.state" in message
    assert await engine.state_of(handle.execution_id) == {}
    types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert types == ["StepScheduled", "StepLeased", "StepStarted", "StepCompleted"]


async def test_state_value_error_is_also_a_type_error() -> None:
    assert issubclass(ss.StateValueError, TypeError)
    assert issubclass(ss.StateValueError, ss.StepsourceError)


async def test_unknown_checkpoint_is_refused_and_nothing_recorded(backend_url: str) -> None:
    engine = make_engine(backend_url)
    async with engine:
        handle = await engine.start("bad.checkpoint")
        result = await handle.result(timeout=10)
    assert isinstance(result, dict)
    error = result["error"]
    assert isinstance(error, str)
    assert "no-such-checkpoint" in error
    assert handle.execution_id in error
    assert "bad.checkpoint" in error
    types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert "CheckpointRestored" not in types
    assert types.count("StateSet") == 1


async def test_unknown_step_id_is_refused_before_anything_is_appended(backend_url: str) -> None:
    engine = make_engine(backend_url)
    with pytest.raises(ss.UnknownStepError, match=r"no\.such\.step") as caught:
        await engine.start("no.such.step", {})
    assert isinstance(caught.value, LookupError)
    assert await engine.executions() == []
    await engine.aclose()


@pytest.mark.parametrize(
    ("payload", "problem"),
    [({}, "count"), ({"count": "many"}, "count"), ({"count": 1, "name": [1]}, "name")],
)
async def test_input_failing_validation_is_refused_and_nothing_appended(
    backend_url: str, payload: dict[str, Any], problem: str
) -> None:
    engine = make_engine(backend_url)
    chosen = "7d9ba7a1-0f50-4b8e-9a84-bd40e6a8c1a5"
    with pytest.raises(ss.InputValidationError) as caught:
        await engine.start("typed.input", payload, execution_id=chosen)
    message = str(caught.value)
    assert problem in message
    assert "typed.input" in message
    assert chosen in message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ss.UnknownExecutionError):
        await engine.events(chosen)
    assert await engine.executions() == []
    await engine.aclose()


async def test_non_json_input_is_refused_before_anything_is_appended(backend_url: str) -> None:
    engine = make_engine(backend_url)
    with pytest.raises(ss.StateValueError, match="input"):
        await engine.start("typed.input", {"count": 1, "extra": math.nan})
    assert await engine.executions() == []
    await engine.aclose()


async def test_unknown_execution_id_is_a_lookup_error(backend_url: str) -> None:
    engine = make_engine(backend_url)
    with pytest.raises(ss.UnknownExecutionError, match="not an execution id"):
        await engine.state_of("definitely-not-a-uuid")
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ss.UnknownExecutionError, match=missing):
        await engine.describe(missing)
    with pytest.raises(ss.UnknownExecutionError):
        await engine.get_handle(missing).result(timeout=1)
    await engine.aclose()


async def test_duplicate_execution_id_is_a_conflict_and_the_first_is_untouched(
    backend_url: str,
) -> None:
    engine = make_engine(backend_url)
    chosen = "3b0f0d9e-2a52-4d4b-8d55-1a2b3c4d5e6f"
    await engine.start("typed.input", {"count": 1}, execution_id=chosen)
    with pytest.raises(ss.VersionConflictError, match="already exists"):
        await engine.start("typed.input", {"count": 2}, execution_id=chosen)
    events = await engine.events(chosen)
    assert len(events) == 1
    first = events[0]
    assert isinstance(first, StepScheduled)
    assert first.input == {"count": 1}
    await engine.aclose()


async def test_malformed_url_is_a_usage_error() -> None:
    with pytest.raises(ss.StepsourceError):
        ss.Engine("mysql://nowhere/db")
    with pytest.raises(ss.StepsourceError):
        ss.Engine("sqlite://")


async def test_payload_over_the_limit_is_refused_before_it_is_recorded(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, max_payload_bytes=1024)

    @engine.step("big.value")
    async def big(ctx: ss.StepContext) -> str:
        try:
            await ctx.set_state("blob", "x" * 5000)
        except ss.LimitExceededError as error:
            await ctx.set_state("small", 1)
            return str(error)
        return "stored"

    async with engine:
        handle = await engine.start("big.value")
        message = await handle.result(timeout=10)
    assert isinstance(message, str)
    assert "1024" in message
    assert await engine.state_of(handle.execution_id) == {"small": 1}
