"""What a new user meets first, through the Python API: where ``Engine()`` keeps its log, the
warning for a step no worker runs, typed results and the value rules for outputs.

(The command line's side of the first minutes is in tests/test_cli_first_minutes.py.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import assert_type

import pydantic
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


class Summary(pydantic.BaseModel):
    processed: int
    label: str


def _register(engine: ss.Engine) -> Callable[..., Awaitable[Summary]]:
    @engine.step("fm.summary")
    async def summary(ctx: ss.StepContext, n: int) -> Summary:
        return Summary(processed=n, label=f"n={n}")

    @engine.step("fm.plain")
    async def plain(ctx: ss.StepContext, n: int) -> dict[str, int]:
        return {"processed": n}

    @engine.step("fm.when")
    async def when(ctx: ss.StepContext) -> dict[str, datetime]:
        return {"at": datetime(2025, 1, 1, tzinfo=UTC)}

    @engine.step("fm.untyped")
    async def untyped(ctx: ss.StepContext):  # type: ignore[no-untyped-def]  # no annotation
        return {"tags": {"a", "b"}}

    return summary


# -- where the log lives -------------------------------------------------------------------
async def test_engine_without_an_argument_uses_stepsource_url_like_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEPSOURCE_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    engine = ss.Engine(workers=1, poll_interval=0.02)
    _register(engine)
    async with engine:
        handle = await engine.start("fm.plain", {"n": 1})
        assert await handle.result(timeout=20) == {"processed": 1}
    assert (tmp_path / "from-env.db").exists()
    assert not (tmp_path / "stepsource.db").exists()
    # the argument wins over the environment
    explicit = ss.Engine(f"sqlite:///{tmp_path / 'explicit.db'}")
    assert explicit.url == f"sqlite:///{tmp_path / 'explicit.db'}"
    assert (await explicit.executions()) == []
    await explicit.aclose()
    # and with neither, the embedded default ./stepsource.db
    monkeypatch.delenv("STEPSOURCE_URL")
    default = ss.Engine(workers=0)
    assert default.url is None
    await default.executions()
    await default.aclose()
    assert (tmp_path / "stepsource.db").exists()


# -- a step nothing runs -------------------------------------------------------------------
async def test_starting_a_step_no_worker_runs_warns_and_the_timeout_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    client = ss.Engine(url, workers=0)
    _register(client)
    with caplog.at_level(logging.WARNING, logger="stepsource"):
        handle = await client.start("fm.plain", {"n": 2})
    warned = [r for r in caplog.records if r.name == "stepsource.engine"]
    assert len(warned) == 1
    assert "no worker has published step 'fm.plain'" in warned[0].getMessage()
    assert handle.execution_id in warned[0].getMessage()
    with pytest.raises(ss.ResultTimeout, match=r"no worker has published step 'fm\.plain'"):
        await handle.result(timeout=0.2)
    # once a worker for the step has run, a start is silent and the result arrives
    worker = client.derive(workers=1, poll_interval=0.02)
    caplog.clear()
    async with worker:
        with caplog.at_level(logging.WARNING, logger="stepsource"):
            again = await client.start("fm.plain", {"n": 3})
        assert await again.result(timeout=20) == {"processed": 3}
        assert await handle.result(timeout=20) == {"processed": 2}
    assert not [r for r in caplog.records if r.name == "stepsource.engine"]
    stuck = await client.start("fm.plain", {"n": 4})
    with pytest.raises(ss.ResultTimeout) as timeout:
        await stuck.result(timeout=0.05)
    assert "no worker has published" not in str(timeout.value)  # it is published now
    await client.aclose()


# -- typed results ---------------------------------------------------------------------------
async def test_results_are_json_or_validated_into_the_type_asked_for(backend_url: str) -> None:
    engine = ss.Engine(backend_url, workers=2, poll_interval=0.02)
    summary = _register(engine)
    async with engine:
        by_id = await engine.start("fm.summary", {"n": 5})
        assert await by_id.result(timeout=20) == {"processed": 5, "label": "n=5"}
        typed = await by_id.result(timeout=20, type=Summary)
        assert typed == Summary(processed=5, label="n=5")
        # a handle started from the handler function validates into its return annotation
        from_handler = await engine.start(summary, {"n": 6})
        result = await from_handler.result(timeout=20)
        assert_type(result, Summary)
        assert result == Summary(processed=6, label="n=6")
        # reattached by id: JSON again, typed on request
        again = engine.get_handle(from_handler.execution_id)
        assert await again.result(timeout=20) == {"processed": 6, "label": "n=6"}
        assert await again.result(type=Summary) == Summary(processed=6, label="n=6")
        plain = await engine.start("fm.plain", {"n": 1})
        with pytest.raises(ss.OutputValidationError, match="does not validate into Summary"):
            await plain.result(timeout=20, type=Summary)

    async def stray(ctx: ss.StepContext) -> int:
        return 1

    with pytest.raises(ss.UnknownStepError, match="stray is not a step handler"):
        await engine.start(stray)
    assert len(await engine.executions(limit=10)) == 3  # the refused start stored nothing
    await engine.aclose()


async def test_an_output_that_is_not_strict_json_fails_the_execution(tmp_path: Path) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'steps.db'}", workers=1, poll_interval=0.02)
    _register(engine)
    async with engine:
        handle = await engine.start("fm.when")
        with pytest.raises(ss.StepFailedError, match="output\\['at'\\] is a datetime") as failed:
            await handle.result(timeout=20)
        # the error's type, and where it happened once, at the end
        assert str(failed.value).startswith(
            "the step failed: stepsource.errors.OutputValidationError: output['at'] is a datetime"
        )
        assert str(failed.value).count(handle.execution_id) == 1
        # without a return annotation the record's own walk refuses it, the same way
        bare = await engine.start("fm.untyped")
        with pytest.raises(ss.StepFailedError, match="output\\['tags'\\] is a set"):
            await bare.result(timeout=20)
    for execution_id in (handle.execution_id, bare.execution_id):
        record = await engine.describe(execution_id)
        assert record.status == "failed"
        assert record.retry_count == 0  # refused, not retried
        assert record.error is not None
        assert record.error["type"] == "OutputValidationError"
        kinds = [type(event).__name__ for event in await engine.events(execution_id)]
        assert "StepCompleted" not in kinds
    await engine.aclose()


async def test_a_model_changed_after_it_was_built_fails_its_annotation(tmp_path: Path) -> None:
    """A returned model instance passed validation as it was: one whose field was assigned a
    value of another type after it was built was recorded as completed, and result() then
    refused it."""
    engine = ss.Engine(f"sqlite:///{tmp_path / 'steps.db'}", workers=1, poll_interval=0.02)

    @engine.step("fm.mutated")
    async def mutated(ctx: ss.StepContext) -> Summary:
        summary = Summary(processed=1, label="one")
        summary.processed = "12,50"  # type: ignore[assignment]  # pydantic lets it through
        return summary

    async with engine:
        handle = await engine.start("fm.mutated")
        with pytest.raises(ss.StepFailedError, match="does not match its annotation"):
            await handle.result(timeout=20)
        kinds = [type(event).__name__ for event in await engine.events(handle.execution_id)]
        assert "StepCompleted" not in kinds
    await engine.aclose()
