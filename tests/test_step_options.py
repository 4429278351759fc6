"""Step options and retry policies: a value a step could not use is refused at registration
(it failed later and far away: the pool did not start, ``engine.start`` raised a bare
AssertionError, every execution failed with a TypeError), and a backoff past the float
range is capped at its maximum instead of failing the worker's bookkeeping."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"retry": "fast"}, "retry must be a RetryPolicy"),
        ({"priority": "high"}, "priority must be an int"),
        ({"priority": 2**70}, "priority must fit 64 bits"),
        ({"timeout": "5"}, "timeout must be a number of seconds > 0"),
        ({"timeout": math.nan}, "timeout must be"),
        ({"timeout": math.inf}, "timeout must be"),
        ({"timeout": -1}, "timeout must be"),
        ({"timeout": 0}, "timeout must be"),
        ({"migrate_input": 5}, "migrate_input must be a function"),
        ({"config": [1]}, "config must be a mapping"),
        ({"optional": "yes"}, "optional must be True or False"),
        ({"display_name": 5}, "display_name must be a str"),
        ({"description": b"x"}, "description must be a str"),
        ({"compatible_with": "1"}, "compatible_with must be a tuple"),
        ({"compatible_with": (1,)}, "compatible_with must be a tuple"),
        ({"max_retries": 10**30}, "max_retries must be an int from 0"),
        ({"max_retries": True}, "max_retries must be an int from 0"),
        ({"max_retries": -1}, "max_retries must be an int from 0"),
    ],
)
async def test_an_option_a_step_cannot_use_is_refused_at_registration(
    options: dict[str, Any], named: str
) -> None:
    engine = ss.Engine("memory://", workers=1)
    with pytest.raises(ss.UsageError, match=named) as refused:

        @engine.step("opts.s", **options)
        async def s(ctx: ss.StepContext) -> str:
            return "ran"

    assert refused.value.step_id == "opts.s"
    assert refused.value.hint

    @engine.step("opts.other")  # the engine still registers and runs other steps
    async def other(ctx: ss.StepContext) -> str:
        return "ran"

    async with engine:
        assert await (await engine.start("opts.other")).result(timeout=10) == "ran"


async def test_usable_options_are_kept() -> None:
    engine = ss.Engine("memory://", workers=1)

    @engine.step(
        "opts.fine",
        timeout=2.5,
        priority=-3,
        optional=True,
        config={"k": [1]},
        compatible_with=("0",),
        display_name="Fine",
        max_retries=2,
        migrate_input=lambda data: data,
    )
    async def fine(ctx: ss.StepContext) -> Any:
        return ctx.step_config

    async with engine:
        assert await (await engine.start("opts.fine")).result(timeout=10) == {"k": [1]}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"initial": "1"}, "RetryPolicy.initial must be a finite number"),
        ({"initial": None}, "RetryPolicy.initial"),
        ({"maximum": True}, "RetryPolicy.maximum"),
        ({"non_retryable": "ValueError"}, "non_retryable must be a tuple"),
        ({"non_retryable": (3,)}, "non_retryable must be a tuple"),
        ({"non_retryable": (object,)}, "non_retryable must be a tuple"),
    ],
)
def test_a_retry_policy_it_cannot_apply_is_refused(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ss.UsageError, match=named):
        ss.RetryPolicy(**fields)


def test_a_backoff_past_the_float_range_is_its_maximum() -> None:
    assert ss.RetryPolicy(initial=1, backoff=1e200, maximum=7).delay_seconds(5) == 7
    assert ss.RetryPolicy(maximum=60).delay_seconds(2000) == 60  # 2.0**1999 overflows
    assert ss.RetryPolicy(initial=0, backoff=1e200).delay_seconds(9) == 0
    assert ss.RetryPolicy(initial=0.5, backoff=2, maximum=60).delay_seconds(3) == 2


async def test_a_step_whose_backoff_overflows_retries_and_fails_with_its_own_error() -> None:
    """The overflow used to escape while the failure was recorded: the worker retried the
    bookkeeping after a lease period, five times, then failed the execution as 'lost'."""
    engine = ss.Engine("memory://", poll_interval=0.01)
    policy = ss.RetryPolicy(initial=0.001, backoff=1e200, maximum=0.01)

    @engine.step("opts.flaky", max_retries=4, retry=policy)
    async def flaky(ctx: ss.StepContext) -> None:
        raise RuntimeError(f"retry {ctx.retry_count}")

    async with engine:
        handle = await engine.start("opts.flaky")
        with pytest.raises(ss.StepFailedError, match="RuntimeError: retry 4"):
            await handle.result(timeout=20)
        record = await engine.describe(handle.execution_id)
    assert record.retry_count == 4


async def test_a_ctx_do_whose_backoff_overflows_keeps_its_tries_and_its_error() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    calls: list[int] = []
    policy = ss.RetryPolicy(initial=0.001, backoff=1e200, maximum=0.01, maximum_attempts=4)

    def down() -> None:
        calls.append(1)
        raise ConnectionError("down")

    @engine.step("opts.do")
    async def do(ctx: ss.StepContext) -> None:
        await ctx.do("call", down, retry=policy)

    async with engine:
        handle = await engine.start("opts.do")
        with pytest.raises(ss.StepFailedError, match="failed after 4 tries with ConnectionError"):
            await handle.result(timeout=20)
    assert len(calls) == 4


async def test_an_engine_with_a_bad_option_never_reaches_its_pool() -> None:
    """A refused registration leaves nothing behind: the engine starts and serves."""
    engine = ss.Engine("memory://", workers=1)
    with pytest.raises(ss.UsageError):
        engine.step("opts.bad", retry="fast")(lambda ctx: None)  # type: ignore[arg-type]
    async with engine:
        with anyio.fail_after(5):
            assert await engine.executions() == []
