"""Resuming an attempt another worker left unfinished: the handler runs again from the top,
operations already recorded are matched and return their recorded results without
appending, reads see the state as it was at that point, and a changed handler is refused
with a NonDeterminismError naming both sides."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.engine.definitions import Durability

pytestmark = pytest.mark.anyio


def make_engine(url: str, behaviour: dict[str, Any], durability: Durability = "each") -> ss.Engine:
    """Every operation committed on its own ("each") unless told otherwise, so that a worker
    going away leaves each of them in the log for the resume to match."""
    engine = ss.Engine(url, poll_interval=0.01, lease_seconds=60, durability=durability)

    @engine.step("resume.me")
    async def handler(ctx: ss.StepContext) -> dict[str, Any]:
        behaviour["runs"] += 1
        if behaviour.get("diverge"):
            await ctx.set_state("z", 0)
        await ctx.set_state("a", 1)
        checkpoint_id = await ctx.create_checkpoint({"phase": 1})
        behaviour.setdefault("checkpoint_ids", []).append(checkpoint_id)
        ctx.add_history_entry("custom", {"n": 1})
        seen_before_b = await ctx.get_state_object()
        await ctx.set_state("b", 2)
        if behaviour["runs"] == 1:
            behaviour["paused"].set()
            await anyio.sleep_forever()  # the worker goes away here
        await ctx.set_state("c", 3)
        return {"checkpoint_id": checkpoint_id, "seen_before_b": seen_before_b}

    return engine


async def test_rule_resume_replays_the_current_attempt_and_appends_only_new_operations(
    backend_url: str,
) -> None:
    behaviour: dict[str, Any] = {"runs": 0, "paused": anyio.Event()}
    first = make_engine(backend_url, behaviour)
    async with first:
        handle = await first.start("resume.me")
        await behaviour["paused"].wait()
    # the block ended: the in-flight handler was cancelled and its lease released
    types = [type(e).__name__ for e in await first.events(handle.execution_id)]
    assert "StepCompleted" not in types

    second = make_engine(backend_url, behaviour) if backend_url != "memory://" else first
    async with second:
        output = await second.get_handle(handle.execution_id).result(timeout=10)
    assert behaviour["runs"] == 2
    events = await second.events(handle.execution_id)
    types = [type(e).__name__ for e in events]
    assert types == [
        "StepScheduled",
        "StepLeased",
        "StepStarted",
        "StateSet",  # a
        "CheckpointCreated",
        "HistoryEntryAdded",
        "StateSet",  # b
        "StepSuspended",  # the first worker stopped: it handed the attempt over
        "StepLeased",  # the second worker resumes the same attempt
        "StateSet",  # c: the first operation that was not recorded
        "StepCompleted",
    ]
    checkpoints = await second.checkpoints_of(handle.execution_id)
    assert isinstance(output, dict)
    assert output["checkpoint_id"] == checkpoints[0].id  # returned from the record
    assert output["seen_before_b"] == {"a": 1}  # the state at that point, not the final one
    assert await second.state_of(handle.execution_id) == {"a": 1, "b": 2, "c": 3}
    record = await second.describe(handle.execution_id)
    assert len(record.executions) == 1
    assert record.executions[0].runs == 2


async def test_boundary_mode_records_again_what_a_lost_worker_only_buffered(
    backend_url: str,
) -> None:
    """Under the default durability the operations before the worker went away were buffered
    (no side effect came after them): nothing of them is in the log, the resumed run records
    them live, and the checkpoint id is the same one the lost run handed to its code."""
    behaviour: dict[str, Any] = {"runs": 0, "paused": anyio.Event()}
    first = make_engine(backend_url, behaviour, durability="boundary")
    async with first:
        handle = await first.start("resume.me")
        await behaviour["paused"].wait()
    lost = [type(e).__name__ for e in await first.events(handle.execution_id)]
    # the stop handed the attempt over (engine/handover.py): what it buffered is not there
    assert lost == ["StepScheduled", "StepLeased", "StepStarted", "StepSuspended"]

    second = (
        make_engine(backend_url, behaviour, durability="boundary")
        if backend_url != "memory://"
        else first
    )
    async with second:
        output = await second.get_handle(handle.execution_id).result(timeout=10)
    types = [type(e).__name__ for e in await second.events(handle.execution_id)]
    assert types == [
        *lost,
        "StepLeased",
        "StateSet",  # a, recorded live this time
        "CheckpointCreated",
        "HistoryEntryAdded",
        "StateSet",  # b
        "StateSet",  # c
        "StepCompleted",  # one commit: the end of the attempt is the boundary
    ]
    assert isinstance(output, dict)
    first_id, second_id = behaviour["checkpoint_ids"]
    assert first_id == second_id == output["checkpoint_id"]
    assert (await second.checkpoints_of(handle.execution_id))[0].id == first_id
    assert await second.state_of(handle.execution_id) == {"a": 1, "b": 2, "c": 3}


async def test_rule_operations_match_by_ordinal_and_a_mismatch_names_both_sides(
    backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    behaviour: dict[str, Any] = {"runs": 0, "paused": anyio.Event()}
    first = make_engine(backend_url, behaviour)
    async with first:
        handle = await first.start("resume.me")
        await behaviour["paused"].wait()
    before = len(await first.events(handle.execution_id))

    behaviour["diverge"] = True
    second = make_engine(backend_url, behaviour) if backend_url != "memory://" else first
    refused = anyio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "was attempted" in record.getMessage():
                refused.set()

    watch = Watch()
    logging.getLogger("stepsource.worker").addHandler(watch)
    try:
        with caplog.at_level(logging.ERROR, logger="stepsource.worker"):
            async with second:
                with anyio.fail_after(10):
                    await refused.wait()
    finally:
        logging.getLogger("stepsource.worker").removeHandler(watch)
    message = next(r.getMessage() for r in caplog.records if "was attempted" in r.getMessage())
    assert "set_state('z') was attempted where set_state('a') was recorded at version 4" in message
    assert handle.execution_id in message
    assert "resume.me" in message
    events = await second.events(handle.execution_id)
    # parked (logged once the StepParked is durable), nothing else written
    assert [type(e).__name__ for e in events[before:]] == ["StepLeased", "StepParked"]
    assert await second.state_of(handle.execution_id) == {"a": 1, "b": 2}


async def test_engine_is_usable_after_its_block_ends_and_after_aclose(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("after.close")
    async def handler(ctx: ss.StepContext) -> int:
        await ctx.set_state("v", 1)
        return 1

    async with engine:
        handle = await engine.start("after.close")
        await handle.result(timeout=10)
    assert await engine.state_of(handle.execution_id) == {"v": 1}
    await engine.aclose()
    assert await engine.state_of(handle.execution_id) == {"v": 1}
    async with engine:  # and it runs again
        again = await engine.start("after.close")
        assert await again.result(timeout=10) == 1


async def test_a_client_engine_starts_and_a_worker_engine_runs(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    def define(engine: ss.Engine) -> None:
        @engine.step("split.roles")
        async def handler(ctx: ss.StepContext, n: int) -> int:
            return n * 2

    client = ss.Engine(url, workers=0)
    define(client)
    worker = ss.Engine(url, poll_interval=0.01)
    define(worker)
    async with client:
        handle = await client.start("split.roles", {"n": 21})
        with pytest.raises(ss.ResultTimeout):
            await handle.result(timeout=0.1)  # a pure client runs nothing
        async with worker:
            assert await handle.result(timeout=10) == 42
