"""What a failure says: the recorded message of a failed attempt or step, and the error
``result()`` raises from it, name the execution and the step once.

An error about the failing execution itself (a misused API, a limit) already knows where it
happened; the record is the execution's own, and the StepFailedError built from it adds the
step and the execution, so the record leaves them out. An error about another execution
(a child, say) keeps them.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.failures import failure_message

pytestmark = pytest.mark.anyio


async def test_a_misused_api_fails_the_step_with_one_where_and_the_hint() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("msg.key")
    async def bad_key(ctx: ss.StepContext) -> None:
        await ctx.set_state(5, "v")  # type: ignore[arg-type]

    @engine.step("msg.sleep")
    async def bad_sleep(ctx: ss.StepContext) -> None:
        await ctx.sleep(-1)

    async with engine:
        handles = [await engine.start("msg.key"), await engine.start("msg.sleep")]
        raised = []
        for handle in handles:
            with pytest.raises(ss.StepFailedError) as caught:
                await handle.result(timeout=10)
            raised.append(caught.value)
    key, sleep = raised
    for error, handle in zip(raised, handles, strict=True):
        text = str(error)
        assert text.count(handle.execution_id) == 1, text
        assert text.count(f"step {error.step_id!r}") == 1, text
        recorded = [
            e
            for e in await engine.events(handle.execution_id)
            if isinstance(e, ev.AttemptFailed | ev.StepFailed)
        ]
        assert recorded
        for event in recorded:
            message = event.error_message if isinstance(event, ev.AttemptFailed) else event.reason
            assert handle.execution_id not in message
    assert str(key) == (
        "the step failed: stepsource.errors.StateValueError: a state key must be a str, not "
        f"an int. Use string keys (step 'msg.key', execution {handles[0].execution_id})"
    )
    assert str(sleep) == (
        "the step failed: stepsource.errors.UsageError: sleep must be a number of seconds "
        f"from 0 to 10**9 (about 31 years), not -1 (step 'msg.sleep', execution "
        f"{handles[1].execution_id})"
    )


async def test_a_failed_child_is_named_in_its_parents_failure() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("msg.child")
    async def child(ctx: ss.StepContext) -> None:
        await ctx.set_state("k", {1, 2})

    @engine.step("msg.parent")
    async def parent(ctx: ss.StepContext) -> None:
        await ctx.run_step("msg.child")

    async with engine:
        handle = await engine.start("msg.parent")
        with pytest.raises(ss.StepFailedError) as caught:
            await handle.result(timeout=10)
    text = str(caught.value)
    children = [
        e for e in await engine.events(handle.execution_id) if isinstance(e, ev.ChildStarted)
    ]
    child_id = children[0].child_execution_id
    assert f"child execution {child_id} of step 'msg.child' failed" in text
    assert "state value 'k' is a set" in text
    assert text.count(handle.execution_id) == 1


async def test_a_handler_that_raises_after_complete_fails_with_its_own_error() -> None:
    """ctx.complete() marks success, recorded when the handler returns: a handler raising
    after it fails that attempt with what it raised (a retry then starts clean), and
    complete() called twice fails with the second call's refusal."""
    engine = ss.Engine("memory://", poll_interval=0.01)
    runs: list[int] = []

    @engine.step("msg.after", max_retries=1, retry=ss.RetryPolicy(initial=0))
    async def after(ctx: ss.StepContext) -> str:
        runs.append(1)
        await ctx.complete({"done": True})
        if len(runs) == 1:
            raise ValueError("broke after complete")
        return "second attempt"

    @engine.step("msg.twice")
    async def twice(ctx: ss.StepContext) -> None:
        await ctx.complete({"a": 1})
        await ctx.complete({"a": 2})

    async with engine:
        retried = await engine.start("msg.after")
        assert await retried.result(timeout=10) == "second attempt"
        doubled = await engine.start("msg.twice")
        with pytest.raises(ss.StepFailedError) as caught:
            await doubled.result(timeout=10)
    failed = [
        e for e in await engine.events(retried.execution_id) if isinstance(e, ev.AttemptFailed)
    ]
    assert [(e.error_type, e.error_message) for e in failed] == [
        ("ValueError", "ValueError: broke after complete")
    ]
    completed = [
        e for e in await engine.events(retried.execution_id) if isinstance(e, ev.StepCompleted)
    ]
    assert [e.details for e in completed] == [{"done": True}]
    assert "UsageError: complete refused: ctx.complete() was already called" in str(caught.value)


TEXT = st.text(alphabet=string.ascii_letters + " .:'", min_size=1, max_size=30).filter(
    lambda text: text == text.strip() != ""
)
IDS = st.uuids().map(str)


@given(reason=TEXT, hint=st.none() | TEXT, step=st.none() | TEXT, here=IDS, there=IDS)
def test_the_record_leaves_out_only_its_own_execution(
    reason: str, hint: str | None, step: str | None, here: str, there: str
) -> None:
    def error(execution_id: str | None) -> ss.UsageError:
        return ss.UsageError(reason, execution_id=execution_id, step_id=step, hint=hint)

    prefix = "stepsource.errors.UsageError: "
    own = failure_message(error(here), 1 << 20, here)
    assert own == prefix + error(here).describe(where=False)
    assert here not in own
    assert failure_message(error(None), 1 << 20, here) == prefix + str(error(None))
    # about another execution, or recorded for none: the message as raised
    assert failure_message(error(there), 1 << 20, here) == prefix + str(error(there))
    assert failure_message(error(here), 1 << 20) == prefix + str(error(here))


def test_a_plain_exception_and_its_notes_are_recorded_as_python_shows_them() -> None:
    plain = ValueError("broken")
    plain.add_note("while charging")
    assert failure_message(plain, 1 << 20, "e") == "ValueError: broken\nwhile charging"
    ours = ss.UsageError("bad", execution_id="e", step_id="s")
    ours.add_note("while charging")
    assert failure_message(ours, 1 << 20, "e") == (
        "stepsource.errors.UsageError: bad\nwhile charging"
    )
