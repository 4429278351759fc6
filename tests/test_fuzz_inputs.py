"""Random garbage fed to the public API and the CLI: each case gets the specific
StepsourceError it deserves, never a crash, never a partial append, and the engine keeps
serving."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.cli import main as cli_main

garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=10),
    st.sets(st.integers(), max_size=3),
    st.dictionaries(st.integers(), st.integers(), max_size=2),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.builds(object),
    st.just(ss.Secret("s")),
)


def is_strict_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value <= 2**64 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_strict_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_strict_json(v) for k, v in value.items())
    return False


def make_engine() -> ss.Engine:
    engine = ss.Engine("memory://", workers=0)

    @engine.step("typed")
    async def typed(ctx: ss.StepContext, count: int, name: str = "x") -> int:
        return count

    return engine


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    step=st.one_of(st.just("typed"), st.text(max_size=8)),
    count=garbage,
    extra=garbage,
    execution_id=st.one_of(st.none(), st.text(max_size=12), st.uuids().map(str)),
    priority=st.one_of(st.none(), garbage),
)
def test_engine_start_refuses_garbage_with_the_right_error(
    step: str, count: Any, extra: Any, execution_id: str | None, priority: Any
) -> None:
    engine = make_engine()

    async def main() -> None:
        payload = {"count": count, "extra": extra}
        try:
            await engine.start(step, payload, execution_id=execution_id, priority=priority)
        except ss.UnknownStepError:
            assert step != "typed"
        except ss.StateValueError:
            assert not is_strict_json(payload)
        except ss.InputValidationError:
            assert is_strict_json(payload)
        except ss.LimitExceededError:
            pass
        except ss.UsageError as error:
            # a bad priority, or an execution_id that is not a UUID (pointed to key=)
            assert priority is not None or (  # noqa: PT017 - one of the errors fuzzing may meet
                execution_id is not None and error.reason.startswith("execution_id must be")
            )
        else:
            assert step == "typed"
            assert is_strict_json(payload)
            assert len(await engine.executions()) == 1
            return
        assert await engine.executions() == []  # nothing half-done
        await engine.start("typed", {"count": 1})  # and it keeps serving
        assert len(await engine.executions()) == 1

    anyio.run(main)


words = st.sampled_from(
    [
        "ls",
        "show",
        "history",
        "events",
        "demo-not",
        "--json",
        "--at",
        "-1",
        "x",
        "--url",
        "memory://",
        "sqlite://",
        "nope://",
        "00000000-0000-4000-8000-000000000000",
        "signal",
        "cancel",
        "replay",
        "verify",
        "--app",
        "a:b",
        "export",
        "--to",
        "--limit",
        "0",
    ]  # tail follows forever: not fuzzed
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=st.lists(words, max_size=5))
def test_the_cli_answers_garbage_with_an_exit_code_never_a_traceback(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(["--url", "memory://", *argv])
        except SystemExit as exit_:  # argparse's own usage errors
            code = int(exit_.code or 0)
    assert code in (0, 1, 2, 3), (argv, code)
    assert "Traceback" not in err.getvalue()
