"""ctx.do durable sub-steps and recorded values: the body runs at least once, its result is
recorded exactly once and returned from the record on every replay and retry."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest

import stepsource as ss
from stepsource.adapters.ports import RecordedEvent
from stepsource.aggregates import events as ev

pytestmark = pytest.mark.anyio

FAST = ss.RetryPolicy(initial=0.01, backoff=1.0, maximum=0.01)


async def event_types(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


async def test_rule_substeps_match_by_name_completed_ones_are_not_run_again_on_retry(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    calls: dict[str, int] = {"charge": 0, "ship": 0}

    def charge() -> dict[str, Any]:
        calls["charge"] += 1
        return {"charged": 100, "tuple": (1, 2)}

    async def ship() -> str:
        calls["ship"] += 1
        if calls["ship"] == 1:
            raise ConnectionError("carrier down")
        return "shipped"

    @engine.step("sub.retry", max_retries=2, retry=FAST)
    async def handler(ctx: ss.StepContext) -> list[Any]:
        receipt = await ctx.do("charge", charge)
        shipment = await ctx.do("ship", ship)
        return [receipt, shipment]

    async with engine:
        handle = await engine.start("sub.retry")
        result = await handle.result(timeout=10)
    assert result == [{"charged": 100, "tuple": [1, 2]}, "shipped"]
    assert calls == {"charge": 1, "ship": 2}
    types = await event_types(engine, handle.execution_id)
    assert types.count("SubStepCompleted") == 2
    assert types.count("SubStepFailed") == 1
    assert types.count("AttemptFailed") == 1


async def test_a_failed_substep_raises_a_recorded_error(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("sub.fails")
    async def handler(ctx: ss.StepContext) -> dict[str, str]:
        try:
            missing: dict[str, int] = {}
            await ctx.do("lookup", lambda: missing["key"])
        except ss.SubStepFailedError as error:
            return {
                "name": error.name,
                "type": error.error_type,
                "cause": type(error.__cause__).__name__,
            }
        return {}

    async with engine:
        handle = await engine.start("sub.fails")
        result = await handle.result(timeout=10)
    assert result == {"name": "lookup", "type": "KeyError", "cause": "KeyError"}


async def test_a_duplicate_name_in_one_attempt_is_refused(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("sub.dup")
    async def handler(ctx: ss.StepContext) -> str:
        await ctx.do("once", lambda: 1)
        try:
            await ctx.do("once", lambda: 2)
        except ss.UsageError as error:
            return str(error)
        return "no error"

    async with engine:
        handle = await engine.start("sub.dup")
        message = await handle.result(timeout=10)
    assert isinstance(message, str)
    assert "ran twice" in message
    assert "sub.dup" in message
    assert (await event_types(engine, handle.execution_id)).count("SubStepCompleted") == 1


async def test_a_body_that_is_not_a_function_is_refused_before_anything_is_recorded() -> None:
    """``ctx.do("charge", charge())`` passes the result (a coroutine, or a value): refused
    with the fix, instead of a recorded TypeError that a retry would repeat."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    async def charge() -> str:
        return "paid"

    @engine.step("sub.called")
    async def handler(ctx: ss.StepContext) -> list[str]:
        refused = []
        for body in (charge(), "paid", None):
            try:
                await ctx.do("charge", body)  # type: ignore[arg-type]
            except ss.UsageError as error:
                refused.append(error.reason)
        refused.append(await ctx.do("charge", charge))  # the name is still free
        return refused

    async with engine:
        handle = await engine.start("sub.called")
        result = await handle.result(timeout=10)
    assert result == [
        "ctx.do('charge', ...) needs a function (sync or async) as its body, not a coroutine",
        "ctx.do('charge', ...) needs a function (sync or async) as its body, not a str",
        "ctx.do('charge', ...) needs a function (sync or async) as its body, not a NoneType",
        "paid",
    ]
    assert (await event_types(engine, handle.execution_id)).count("SubStepCompleted") == 1


def resumable(url: str, behaviour: dict[str, Any]) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, lease_seconds=60)

    async def side_effect(name: str) -> str:
        behaviour["bodies"].append(name)
        if name == "pause-inside" and behaviour["runs"] == 1:
            behaviour["paused"].set()
            await anyio.sleep_forever()  # killed between the side effect and its record
        return f"{name}-done"

    @engine.step("sub.resume")
    async def handler(ctx: ss.StepContext) -> dict[str, Any]:
        behaviour["runs"] += 1
        first = await ctx.do("first", lambda: side_effect("first"))
        when = await ctx.now()
        number = await ctx.random()
        ident = await ctx.uuid4()

        async def branch(label: str) -> str:
            await ctx.set_state(label, label.upper())

            async def inner() -> str:
                await ctx.set_state(f"{label}-inner", True)
                return f"{label}-inner-result"

            return str(await ctx.do(f"{label}.inner", inner))

        results: dict[str, Any] = {}

        async def run(label: str) -> None:
            results[label] = await ctx.do(label, lambda: branch(label))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "left")
            tg.start_soon(run, "right")
        key = ""

        async def keyed() -> str:
            nonlocal key
            key = ctx.idempotency_key
            return str(await side_effect("pause-inside"))

        last = await ctx.do("pause-inside", keyed)
        return {
            "first": first,
            "when": when.isoformat(),
            "number": number,
            "uuid": str(ident),
            "branches": results,
            "last": last,
            "key": key,
        }

    return engine


async def test_rule_do_body_runs_at_least_once_and_its_result_is_recorded_exactly_once(
    backend_url: str,
) -> None:
    behaviour: dict[str, Any] = {"runs": 0, "bodies": [], "paused": anyio.Event()}
    engine = resumable(backend_url, behaviour)
    async with engine:
        handle = await engine.start("sub.resume")
        await behaviour["paused"].wait()
    before = await engine.events(handle.execution_id)
    recorded_values = [
        getattr(e, "value", None) for e in before if type(e).__name__ == "ValueRecorded"
    ]

    second = engine if backend_url == "memory://" else resumable(backend_url, behaviour)
    async with second:
        result = await second.get_handle(handle.execution_id).result(timeout=10)
    assert isinstance(result, dict)
    # "first" ran once; the body killed before its record ran again (at least once)
    assert behaviour["bodies"] == ["first", "pause-inside", "pause-inside"]
    assert [result["when"], result["number"], result["uuid"]] != [None, None, None]
    assert recorded_values[1] == result["number"]
    assert recorded_values[2] == result["uuid"]
    assert result["branches"] == {"left": "left-inner-result", "right": "right-inner-result"}
    assert result["key"] == f"{handle.execution_id}/pause-inside"
    types = await event_types(second, handle.execution_id)
    assert types.count("SubStepCompleted") == 6  # first, 2 inner, 2 branches, pause-inside
    assert types.count("ValueRecorded") == 3
    assert types.count("StateSet") == 4
    assert await second.state_of(handle.execution_id) == {
        "left": "LEFT",
        "left-inner": True,
        "right": "RIGHT",
        "right-inner": True,
    }


async def test_a_substep_records_when_its_body_started_and_old_logs_read_it_as_unknown() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("sub.timed")
    async def timed(ctx: ss.StepContext) -> int:
        async def slow() -> int:
            await anyio.sleep(0.05)
            return 1

        return int(await ctx.do("slow", slow))

    async with engine:
        handle = await engine.start("sub.timed")
        assert await handle.result(timeout=10) == 1
    [done] = [
        e for e in await engine.events(handle.execution_id) if isinstance(e, ev.SubStepCompleted)
    ]
    assert done.body_started_ms is not None
    took = done.timestamp.timestamp() * 1000 - done.body_started_ms
    assert took >= 50  # the body's run, from its start to its recorded result
    # a version-1 event (an older log) has no such field: read as unknown
    data = {k: v for k, v in vars(done).items() if k not in ("originator_id", "originator_version")}
    del data["body_started_ms"]
    data["timestamp"] = done.timestamp.isoformat()
    old = RecordedEvent(
        handle.execution_id,
        done.originator_version,
        "stepsource:SubStepCompleted",
        orjson.dumps(data),
        1,
    )
    [read] = engine.store.codec.decode_many([old])
    assert isinstance(read, ev.SubStepCompleted)
    assert read.body_started_ms is None
    assert read.value == 1
