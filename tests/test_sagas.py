"""Sagas: every compensation runs, an undone action runs again on the step's retry, and a
mistake in a saga's names or functions is refused before its action runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.definitions import Durability
from stepsource.testing import crash_everywhere

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'sagas.db'}"


def effect(log: list[str], text: str, result: Any = None) -> Callable[[], Any]:
    def run() -> Any:
        log.append(text)
        return result

    return run


async def outcome(engine: ss.Engine, step: str) -> tuple[Any, list[str]]:
    """The result (or the failure's text) and the ctx.do names recorded, in order."""
    async with engine:
        handle = await engine.start(step)
        try:
            result: Any = await handle.result(timeout=20)
        except ss.StepFailedError as failed:
            result = str(failed)
        events = await engine.events(handle.execution_id)
    names = [e.name for e in events if isinstance(e, ev.SubStepCompleted | ev.SubStepFailed)]
    return result, names


async def test_a_failing_compensation_does_not_stop_the_others(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)
    log: list[str] = []

    def broken_refund(payment: str) -> None:
        log.append(f"refund {payment}")
        raise ConnectionError("bank unreachable")

    @engine.step("order")
    async def order(ctx: ss.StepContext) -> dict[str, Any]:
        saga = ctx.saga("order")
        try:
            async with saga:
                await saga.step("reserve", effect(log, "reserve", "r-1"), compensate=log.append)
                await saga.step("charge", effect(log, "charge", "p-1"), compensate=broken_refund)
                await saga.step("notify", effect(log, "notify", "n-1"), compensate=log.append)
                raise LookupError("no courier")
        except ss.CompensationError as error:
            return {
                "failed": error.failed,
                "trigger": error.trigger,
                "cause": repr(error.__cause__),
                "compensated": saga.compensated,
                "text": error.reason,
            }

    result, names = await outcome(engine, "order")
    # the newest first, and the one before the failing refund still ran
    assert log == ["reserve", "charge", "notify", "n-1", "refund p-1", "r-1"]
    assert result["compensated"] == ["notify", "reserve"]
    assert result["failed"] == {
        "charge": "ctx.do('order:undo:charge') failed with ConnectionError: bank unreachable"
    }
    assert result["trigger"] == "LookupError: no courier"
    assert result["cause"] == "LookupError('no courier')"
    assert result["text"] == (
        "saga 'order' could not undo 'charge' after LookupError: no courier: "
        "ctx.do('order:undo:charge') failed with ConnectionError: bank unreachable"
    )
    assert names[-3:] == ["order:undo:notify", "order:undo:charge", "order:undo:reserve"]


async def test_an_uncaught_compensation_failure_fails_the_step_naming_both(url: str) -> None:
    engine = ss.Engine(url, poll_interval=0.01)

    def refuse(_: Any) -> None:
        raise ValueError("already refunded")

    @engine.step("order")
    async def order(ctx: ss.StepContext) -> None:
        async with ctx.saga("pay") as saga:
            await saga.step("charge", lambda: "p-1", compensate=refuse)
            await saga.step("ship", effect([], "ship"))
            raise RuntimeError("address invalid")

    result, _ = await outcome(engine, "order")
    assert result.startswith(
        "the step failed: stepsource.errors.CompensationError: saga 'pay' could not undo "
        "'charge' after RuntimeError: address invalid: ctx.do('pay:undo:charge') failed with "
        "ValueError: already refunded. Its other compensations ran"
    )


def define_retried_order(engine: ss.Engine, log: list[str], refund_fails: bool = False) -> None:
    """An order whose charge fails in the first attempt only (and, with ``refund_fails``, so
    does the release of its reservation); the step is retried once."""

    @engine.step("order", max_retries=1, retry=ss.RetryPolicy(initial=0.01))
    async def order(ctx: ss.StepContext) -> str:
        first = ctx.info.attempt_number == 1

        def charge() -> str:
            log.append("charge")
            if first:
                raise RuntimeError("card declined")
            return "p-1"

        def release(reservation: str) -> None:
            log.append(f"release {reservation}")
            if refund_fails and first:
                raise ConnectionError("warehouse unreachable")

        async with ctx.saga("order") as saga:
            reservation = await saga.step(
                "reserve",
                effect(log, "reserve", f"r-{ctx.info.attempt_number}"),
                compensate=release,
            )
            await saga.step("charge", charge)
            await saga.step("ship", effect(log, "ship"))
        return str(reservation)


async def test_an_action_undone_in_a_failed_attempt_runs_again_in_the_retry(url: str) -> None:
    """Attempt 1 reserves, fails to charge and releases the reservation; attempt 2 must not
    ship on the released reservation: it reserves again."""
    engine = ss.Engine(url, poll_interval=0.01)
    log: list[str] = []
    define_retried_order(engine, log)
    result, names = await outcome(engine, "order")
    assert log == ["reserve", "charge", "release r-1", "reserve", "charge", "ship"]
    assert result == "r-2"
    assert names == [
        "order:reserve",
        "order:charge",
        "order:undo:reserve",
        "order#2:reserve",
        "order:charge",
        "order:ship",
    ]


async def test_an_action_whose_compensation_failed_is_not_run_again(url: str) -> None:
    """The release failed in attempt 1: the reservation still holds, so attempt 2 keeps it
    (its recorded result) instead of reserving twice."""
    engine = ss.Engine(url, poll_interval=0.01)
    log: list[str] = []
    define_retried_order(engine, log, refund_fails=True)
    result, _ = await outcome(engine, "order")
    assert log == ["reserve", "charge", "release r-1", "charge", "ship"]
    assert result == "r-1"


@pytest.mark.parametrize("durability", ["boundary", "each"])
async def test_a_crash_anywhere_in_a_retried_saga_ends_as_the_uninterrupted_run(
    durability: Durability,
) -> None:
    engine = ss.Engine("memory://", workers=0)
    define_retried_order(engine, [])
    report = await crash_everywhere(engine, "order", durability=durability, timeout=20)
    assert report.crashes > 0
    assert report.operations_tried == report.operations


MISTAKES: dict[str, tuple[Callable[[ss.StepContext, list[str]], Any], str]] = {}


def mistake(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        MISTAKES[fn.__name__] = (fn, text)
        return fn

    return register


@mistake("saga 'o', step 'a': compensate= must be a function (sync or async), not a str")
async def compensation_by_name(ctx: ss.StepContext, log: list[str]) -> None:
    async with ctx.saga("o") as saga:
        await saga.step("a", effect(log, "a"), compensate="release")  # type: ignore[arg-type]


@mistake("saga 'o', step 'a': the action must be a function (sync or async), not a NoneType")
async def action_called_already(ctx: ss.StepContext, log: list[str]) -> None:
    async with ctx.saga("o") as saga:
        await saga.step("a", effect(log, "a")())


@mistake("saga 'o' already ran a step named 'a'. Step names are unique in a saga")
async def step_name_twice(ctx: ss.StepContext, log: list[str]) -> None:
    async with ctx.saga("o") as saga:
        await saga.step("a", effect(log, "a"))
        await saga.step("a", effect(log, "a again"))


@mistake("ctx.saga('saga') was already used in this attempt")
async def default_saga_name_twice(ctx: ss.StepContext, log: list[str]) -> None:
    async with ctx.saga() as first:
        await first.step("a", effect(log, "a"))
    async with ctx.saga() as second:
        await second.step("b", effect(log, "b"))


@pytest.mark.parametrize("kind", sorted(MISTAKES))
async def test_a_mistake_in_a_saga_is_refused_before_its_action_runs(kind: str) -> None:
    body, text = MISTAKES[kind]
    engine = ss.Engine("memory://", poll_interval=0.01)
    log: list[str] = []

    @engine.step("s")
    async def s(ctx: ss.StepContext) -> None:
        await body(ctx, log)

    result, _ = await outcome(engine, "s")
    assert f"stepsource.errors.UsageError: {text}" in result
    assert log in ([], ["a"])  # the refused action never ran (only an earlier 'a' did)


@pytest.mark.parametrize(
    ("saga", "step", "text"),
    [
        ("", "a", "a saga's name must be a non-empty str without ':' or '#', not an empty one"),
        ("o#2", "a", "a saga's name must be a non-empty str without ':' or '#', 'o#2' holds '#'"),
        ("o", "undo:a", "saga 'o': the step name must be a non-empty str without ':', 'undo:a'"),
        ("o", 1, "saga 'o': the step name must be a non-empty str without ':', not an int"),
    ],
)
async def test_a_name_that_would_make_ambiguous_records_is_refused(
    saga: str, step: Any, text: str
) -> None:
    """The sub-step names are ``<saga>:<step>``, ``<saga>:undo:<step>`` and ``<saga>#2:...``:
    a ``:`` or ``#`` where they separate parts could name another saga's or step's record."""
    engine = ss.Engine("memory://", poll_interval=0.01)
    log: list[str] = []

    @engine.step("s")
    async def named(ctx: ss.StepContext) -> None:
        async with ctx.saga(saga) as opened:
            await opened.step(step, effect(log, "ran"))

    result, _ = await outcome(engine, "s")
    assert f"stepsource.errors.UsageError: {text}" in result
    assert log == []
