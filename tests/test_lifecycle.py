"""Completion, failure and retries, as the contract's Semantics section pins them."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio

FAST = ss.RetryPolicy(initial=0.01, backoff=1.0, maximum=0.01)


async def event_types(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


async def test_rule_completion_is_written_once_when_the_handler_returns(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    seen: dict[str, Any] = {}

    @engine.step("life.complete")
    async def handler(ctx: ss.StepContext) -> dict[str, int]:
        await ctx.set_state("x", 1)
        await ctx.complete({"status": "success"})
        seen["status_after_complete"] = ctx.execution_metadata.status
        with pytest.raises(ss.StepsourceError, match="complete"):
            await ctx.set_state("y", 2)
        return {"answer": 42}

    async with engine:
        handle = await engine.start("life.complete")
        assert await handle.result(timeout=10) == {"answer": 42}
    types = await event_types(engine, handle.execution_id)
    assert types == ["StepScheduled", "StepLeased", "StepStarted", "StateSet", "StepCompleted"]
    history = await engine.history_of(handle.execution_id)
    assert history[-1].type == "completed"
    assert history[-1].details == {"output": {"answer": 42}, "details": {"status": "success"}}
    assert seen["status_after_complete"] == "executing"
    assert await engine.state_of(handle.execution_id) == {"x": 1}


async def test_fail_records_step_failed_is_terminal_and_never_retried(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    runs: list[int] = []

    @engine.step("life.fail", max_retries=3, retry=FAST)
    async def handler(ctx: ss.StepContext) -> None:
        runs.append(ctx.info.attempt_number)
        await ctx.fail("invalid data format", {"errorCode": "INVALID_FORMAT"})
        raise AssertionError("fail() must unwind the handler")

    async with engine:
        handle = await engine.start("life.fail")
        with pytest.raises(ss.StepFailedError, match="invalid data format"):
            await handle.result(timeout=10)
    assert runs == [1]
    record = await engine.describe(handle.execution_id)
    assert record.status == "failed"
    history = await engine.history_of(handle.execution_id)
    assert history[-1].type == "failed"
    assert history[-1].details["details"] == {"errorCode": "INVALID_FORMAT"}
    assert (await event_types(engine, handle.execution_id)).count("StepFailed") == 1


async def test_a_raising_handler_is_retried_with_retry_info_and_the_latest_checkpoint(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    seen: list[dict[str, Any]] = []

    @engine.step("life.retry", max_retries=2, retry=FAST)
    async def handler(ctx: ss.StepContext) -> str:
        seen.append(
            {
                "attempt": ctx.info.attempt_number,
                "is_retry": ctx.is_retry(),
                "is_last_retry": ctx.is_last_retry(),
                "retry_count": ctx.retry_count,
                "max_retries": ctx.max_retries,
                "cursor": ctx.checkpoint_cursor,
                "items": ctx.checkpoint_items_processed,
                "acc": ctx.accumulated_results,
                "has": ctx.has_checkpoint(),
            }
        )
        start = ctx.checkpoint_cursor or 0
        assert isinstance(start, int)
        await ctx.create_checkpoint(
            {"attempt": ctx.info.attempt_number},
            cursor=start + 10,
            items_processed=start + 10,
            accumulated_results={"sum": start},
        )
        if ctx.info.attempt_number < 3:
            raise RuntimeError(f"flaky upstream #{ctx.info.attempt_number}")
        return "done"

    async with engine:
        handle = await engine.start("life.retry")
        assert await handle.result(timeout=10) == "done"
    assert [s["attempt"] for s in seen] == [1, 2, 3]
    assert [s["is_retry"] for s in seen] == [False, True, True]
    assert [s["is_last_retry"] for s in seen] == [False, False, True]
    assert [s["retry_count"] for s in seen] == [0, 1, 2]
    assert {s["max_retries"] for s in seen} == {2}
    assert [s["cursor"] for s in seen] == [None, 10, 20]
    assert [s["items"] for s in seen] == [None, 10, 20]
    assert [s["acc"] for s in seen] == [None, {"sum": 0}, {"sum": 10}]
    assert [s["has"] for s in seen] == [False, True, True]
    record = await engine.describe(handle.execution_id)
    assert [a.id for a in record.executions] == [1, 2, 3]
    assert record.executions[0].output == {
        "error": {"type": "RuntimeError", "message": "RuntimeError: flaky upstream #1"}
    }
    assert record.retry_count == 2
    history_types = [e.type for e in await engine.history_of(handle.execution_id)]
    assert history_types.count("retry") == 2
    assert history_types[-1] == "completed"


async def test_retries_exhausted_fail_the_step_with_the_last_error(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("life.poison", max_retries=1, retry=FAST)
    async def handler(ctx: ss.StepContext) -> None:
        raise ValueError("always broken")

    async with engine:
        handle = await engine.start("life.poison")
        with pytest.raises(ss.StepFailedError, match="always broken"):
            await handle.result(timeout=10)
    types = await event_types(engine, handle.execution_id)
    assert types.count("AttemptFailed") == 2
    assert types[-1] == "StepFailed"
    # two attempts failed, one of them was retried: retries 1/1
    assert (await engine.describe(handle.execution_id)).retry_count == 1


async def test_non_retryable_errors_fail_at_once(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    policy = ss.RetryPolicy(initial=0.01, non_retryable=(KeyError, "PermissionError"))

    @engine.step("life.fatal", max_retries=5, retry=policy)
    async def handler(ctx: ss.StepContext, which: str) -> None:
        raise KeyError(which) if which == "key" else PermissionError(which)

    async with engine:
        for which in ("key", "perm"):
            handle = await engine.start("life.fatal", {"which": which})
            with pytest.raises(ss.StepFailedError):
                await handle.result(timeout=10)
            assert (await event_types(engine, handle.execution_id)).count("AttemptFailed") == 1


class Summary(pydantic.BaseModel):
    total: int


async def test_output_failing_its_annotation_is_a_step_failed_not_retried(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    runs: list[int] = []

    @engine.step("life.badoutput", max_retries=3, retry=FAST)
    async def handler(ctx: ss.StepContext) -> Summary:
        runs.append(1)
        return {"total": "not a number"}  # type: ignore[return-value]

    async with engine:
        handle = await engine.start("life.badoutput")
        with pytest.raises(ss.StepFailedError, match="annotation"):
            await handle.result(timeout=10)
    assert runs == [1]


async def test_model_output_comes_back_as_json_data(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    class Item(pydantic.BaseModel):
        id: str
        qty: int = 1

    @engine.step("life.models")
    async def handler(ctx: ss.StepContext, items: list[Item]) -> Summary:
        assert all(isinstance(item, Item) for item in items)
        return Summary(total=sum(item.qty for item in items))

    async with engine:
        handle = await engine.start("life.models", {"items": [{"id": "a", "qty": 2}, {"id": "b"}]})
        assert await handle.result(timeout=10) == {"total": 3}


async def test_a_handler_over_its_timeout_fails_the_attempt(backend_url: str) -> None:
    import anyio

    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("life.slow", timeout=0.05)
    async def handler(ctx: ss.StepContext) -> None:
        await anyio.sleep(30)

    async with engine:
        handle = await engine.start("life.slow")
        # the limit is said (it read "the step failed: TimeoutError", nothing more)
        with pytest.raises(
            ss.StepFailedError,
            match=r"TimeoutError: the handler ran past the step's timeout of 0\.05 s",
        ):
            await handle.result(timeout=10)


async def test_result_timeout_is_a_timeout_error_and_the_execution_goes_on(
    backend_url: str,
) -> None:
    import anyio

    engine = ss.Engine(backend_url, poll_interval=0.01)
    release = anyio.Event()

    @engine.step("life.wait")
    async def handler(ctx: ss.StepContext) -> str:
        await release.wait()
        return "finished"

    async with engine:
        handle = await engine.start("life.wait")
        with pytest.raises(ss.ResultTimeout) as caught:
            await handle.result(timeout=0.05)
        assert isinstance(caught.value, TimeoutError)
        assert handle.execution_id in str(caught.value)
        release.set()
        assert await handle.result(timeout=10) == "finished"


async def test_a_handle_waiting_on_a_long_execution_reads_its_last_event_at_each_look(
    backend_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handle that did not start the execution looks at the log each time it changes; a
    look reads the stream's last event (an ending is always last), never every event
    appended since the look before, so waiting costs the same whatever the execution writes."""
    import anyio

    engine = ss.Engine(backend_url, poll_interval=0.01)
    rounds, per_round = 20, 100

    @engine.step("life.long")
    async def handler(ctx: ss.StepContext) -> int:
        for r in range(rounds):
            for i in range(per_round):
                await ctx.set_state("i", r * per_round + i)
            await ctx.flush()  # one commit per round: each wakes the waiting handle
            await anyio.sleep(0.01)
        return rounds * per_round

    store = engine.store
    read = 0
    events = store.events

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal read
        found = await events(*args, **kwargs)
        read += len(found)
        return found

    async with engine:
        started = await engine.start("life.long")
        waiting = engine.get_handle(started.execution_id)  # as another process's would
        monkeypatch.setattr(store, "events", counted)
        assert await waiting.result(timeout=60) == rounds * per_round
        looked = read
    written = len(await engine.events(started.execution_id))
    assert written > rounds * per_round
    # two events a look at most (the first look also reads the first event), however many
    # the execution appended since the last: looks come at most once per commit here
    assert looked <= 2 * (rounds + 3)
