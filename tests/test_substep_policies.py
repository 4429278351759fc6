"""ctx.do retry and timeout policies: each failed try is recorded with its number, error
and next try time; a resumed attempt goes on at the next try after what is left of the
backoff; non-retryable errors fail at once; a try longer than its timeout is cancelled;
tries never exceed the maximum, and a crash at any point gives the record of an
uninterrupted run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.substep_policy import backoff_ms
from stepsource.testing import crash_everywhere

pytestmark = pytest.mark.anyio

QUICK = ss.RetryPolicy(initial=0.01, backoff=2.0, maximum=0.05, maximum_attempts=4)


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'steps.db'}"


def tries_in(events: list[Any], name: str) -> list[ev.SubStepTryFailed]:
    return [e for e in events if isinstance(e, ev.SubStepTryFailed) and e.name == name]


async def test_a_failing_body_is_retried_in_place_each_try_recorded(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError(f"down {calls['n']}")
        return "ok"

    @engine.step("pol.flaky")
    async def handler(ctx: ss.StepContext) -> str:
        return str(await ctx.do("call", flaky, retry=QUICK))

    async with engine:
        handle = await engine.start("pol.flaky")
        assert await handle.result(timeout=10) == "ok"
    events = await engine.events(handle.execution_id)
    tries = tries_in(events, "call")
    assert [(t.try_number, t.error_type, t.error_message) for t in tries] == [
        (1, "ConnectionError", "down 1"),
        (2, "ConnectionError", "down 2"),
    ]
    assert all(t.retry_at_ms >= t.timestamp.timestamp() * 1000 for t in tries)
    names = [type(e).__name__ for e in events]
    assert "AttemptFailed" not in names  # retried inside the attempt, not by the step
    assert names.count("SubStepCompleted") == 1
    history = await engine.history_of(handle.execution_id)
    assert [h.details["try"] for h in history if h.type == "substep_retry"] == [1, 2]


async def test_the_last_failure_is_the_substeps_with_its_try_count(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    calls = {"n": 0}

    def broken() -> None:  # a sync body, in a thread
        calls["n"] += 1
        raise ConnectionError("still down")

    @engine.step("pol.broken")
    async def handler(ctx: ss.StepContext) -> str:
        try:
            await ctx.do("call", broken, retry=ss.RetryPolicy(initial=0.01, maximum_attempts=3))
        except ss.SubStepFailedError as error:
            return f"{error.tries}:{error.error_type}:{error}"
        return "no error"

    async with engine:
        handle = await engine.start("pol.broken")
        out = str(await handle.result(timeout=10))
    assert calls["n"] == 3
    assert out.startswith("3:ConnectionError:")
    assert "after 3 tries" in out
    events = await engine.events(handle.execution_id)
    assert len(tries_in(events, "call")) == 2
    assert sum(isinstance(e, ev.SubStepFailed) for e in events) == 1


async def test_non_retryable_errors_fail_at_once(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    calls = {"n": 0}

    async def invalid() -> None:
        calls["n"] += 1
        raise ValueError("bad card")

    policy = ss.RetryPolicy(initial=0.01, maximum_attempts=5, non_retryable=("ValueError",))

    @engine.step("pol.invalid")
    async def handler(ctx: ss.StepContext) -> int:
        try:
            await ctx.do("charge", invalid, retry=policy)
        except ss.SubStepFailedError as error:
            return error.tries
        return 0

    async with engine:
        handle = await engine.start("pol.invalid")
        assert await handle.result(timeout=10) == 1
    assert calls["n"] == 1
    assert tries_in(await engine.events(handle.execution_id), "charge") == []


async def test_a_try_longer_than_its_timeout_is_cancelled_and_retried(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    calls = {"n": 0, "finished": 0}

    async def slow_then_fast() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            await anyio.sleep(30)
            calls["finished"] += 1
        return "fast"

    @engine.step("pol.slow")
    async def handler(ctx: ss.StepContext) -> list[str]:
        first = await ctx.do("fetch", slow_then_fast, retry=QUICK, timeout=0.2)
        try:
            await ctx.do("hang", lambda: anyio.sleep(30), timeout=0.05)
        except ss.SubStepFailedError as error:
            return [str(first), error.error_type, str(error.tries)]
        return ["no timeout"]

    async with engine:
        handle = await engine.start("pol.slow")
        assert await handle.result(timeout=10) == ["fast", "SubStepTimeoutError", "1"]
    assert calls == {"n": 2, "finished": 0}
    tries = tries_in(await engine.events(handle.execution_id), "fetch")
    assert [(t.try_number, t.error_type) for t in tries] == [(1, "SubStepTimeoutError")]


async def test_a_sync_body_over_its_timeout_is_waited_for_and_counts_as_timed_out(
    url: str,
) -> None:
    """A thread cannot be interrupted: the try ends when the body returns, its result is
    discarded and the try fails with SubStepTimeoutError."""
    engine = ss.Engine(url, poll_interval=0.01)
    finished: list[str] = []

    def blocking() -> str:
        time.sleep(0.3)
        finished.append("returned")
        return "late"

    @engine.step("pol.thread")
    async def handler(ctx: ss.StepContext) -> str:
        try:
            return str(await ctx.do("block", blocking, timeout=0.05))
        except ss.SubStepFailedError as error:
            return error.error_type

    async with engine:
        handle = await engine.start("pol.thread")
        assert await handle.result(timeout=10) == "SubStepTimeoutError"
    assert finished == ["returned"]


async def test_a_plain_def_handler_takes_the_same_policy(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("blip")
        return 7

    @engine.step("pol.sync")
    def handler(ctx: Any) -> int:
        return int(ctx.do("call", flaky, retry=QUICK))

    async with engine:
        handle = await engine.start("pol.sync")
        assert await handle.result(timeout=10) == 7
    assert len(tries_in(await engine.events(handle.execution_id), "call")) == 1


async def test_a_worker_lost_during_the_backoff_resumes_at_the_next_try(tmp_path: Path) -> None:
    """The first worker records try 1 and goes away during a 1 s backoff; the second one
    takes the attempt over, waits out the rest of the backoff and runs try 2 (not try 1)."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    calls: list[str] = []
    backing_off = anyio.Event()
    policy = ss.RetryPolicy(initial=1.0, maximum_attempts=3)

    def make(name: str) -> ss.Engine:
        engine = ss.Engine(url, poll_interval=0.01, lease_seconds=60)

        async def body() -> str:
            calls.append(name)
            if len(calls) == 1:
                backing_off.set()
                raise ConnectionError("first try fails")
            return f"done by {name}"

        @engine.step("pol.resume")
        async def handler(ctx: ss.StepContext) -> str:
            return str(await ctx.do("call", body, retry=policy))

        return engine

    first = make("first")
    async with first:
        handle = await first.start("pol.resume")
        await backing_off.wait()
        with anyio.fail_after(10):
            while not tries_in(await first.events(handle.execution_id), "call"):
                await anyio.sleep(0.01)
    second = make("second")
    async with second:
        assert await second.get_handle(handle.execution_id).result(timeout=10) == ("done by second")
    assert calls == ["first", "second"]
    events = await second.events(handle.execution_id)
    (tried,) = tries_in(events, "call")
    done = next(e for e in events if isinstance(e, ev.SubStepCompleted))
    assert tried.try_number == 1
    assert done.timestamp.timestamp() * 1000 >= tried.retry_at_ms  # the backoff was waited out


def test_jitter_is_derived_from_the_coordinates_and_stays_in_its_band() -> None:
    policy = ss.RetryPolicy(initial=1.0, backoff=2.0, maximum=10.0, jitter=0.5)
    delays = [backoff_ms(policy, n, "exec-1", "call") for n in (1, 2, 3)]
    assert delays == [backoff_ms(policy, n, "exec-1", "call") for n in (1, 2, 3)]
    assert [backoff_ms(policy, n, "exec-2", "call") for n in (1, 2, 3)] != delays
    for n, delay in zip((1, 2, 3), delays, strict=True):
        base = 1000 * min(2.0 ** (n - 1), 10.0)
        assert 0.5 * base <= delay <= 1.5 * base


def test_a_policy_is_checked_when_it_is_made() -> None:
    with pytest.raises(ss.UsageError):
        ss.RetryPolicy(maximum_attempts=0)
    with pytest.raises(ss.UsageError):
        ss.RetryPolicy(jitter=2.0)


def define_prop(engine: ss.Engine, failures: int, limit: int) -> None:
    policy = ss.RetryPolicy(initial=0.001, backoff=1.0, maximum=0.001, maximum_attempts=limit)

    @engine.step("pol.prop")
    async def handler(ctx: ss.StepContext) -> Any:
        async def body() -> int:
            tried = ctx.substep_try  # 1 for the first try, read from the record
            if tried <= failures:
                raise ConnectionError(f"try {tried}")
            return tried

        try:
            return await ctx.do("call", body, retry=policy)
        except ss.SubStepFailedError as error:
            return f"failed after {error.tries}"


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(failures=st.integers(min_value=0, max_value=4), limit=st.integers(1, 3))
def test_property_tries_never_exceed_the_maximum_and_crashes_change_nothing(
    failures: int, limit: int
) -> None:
    """A body failing its first ``failures`` tries under ``maximum_attempts=limit`` runs
    min(failures + 1, limit) times, and a crash at every commit and every operation, each
    resumed, ends with the record of the uninterrupted run (crash_everywhere)."""

    async def main() -> None:
        engine = ss.Engine("memory://", workers=0)
        define_prop(engine, failures, limit)
        report = await crash_everywhere(engine, "pol.prop", timeout=20)
        assert report.crashes > 0  # it crashed somewhere, resumed and compared
        probe = ss.Engine("memory://", poll_interval=0.01)
        define_prop(probe, failures, limit)
        async with probe:
            handle = await probe.start("pol.prop")
            result = await handle.result(timeout=10)
            tries = tries_in(await probe.events(handle.execution_id), "call")
        runs = min(failures + 1, limit)
        assert len(tries) == runs - 1 <= limit - 1
        assert [t.try_number for t in tries] == list(range(1, runs))
        assert result == (failures + 1 if failures < limit else f"failed after {limit}")

    anyio.run(main)
