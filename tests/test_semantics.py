"""The Semantics section of the design contract, one test per rule that no other file names.

Rules proved elsewhere, by name: test_rule_resume_replays_the_current_attempt_... and
test_rule_operations_match_by_ordinal_... (test_resume_replay.py),
test_rule_do_body_runs_at_least_once_... and test_rule_substeps_match_by_name_...
(test_substeps.py), test_rule_completion_is_written_once_... (test_lifecycle.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.engine.clock import SystemClock, to_ms

pytestmark = pytest.mark.anyio

FAST = ss.RetryPolicy(initial=0.01, backoff=1.0, maximum=0.01)


async def event_types(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


class LaterClock(SystemClock):
    """A worker whose clock runs an hour ahead: every lease taken before looks expired."""

    def now(self) -> datetime:
        return super().now() + timedelta(hours=1)


def test_the_clock_in_milliseconds_is_its_time_in_milliseconds() -> None:
    """Leases, deadlines and due times read ``now_ms``, records ``now``: the two agree, and
    a clock that moves ``now`` (a test's, a skewed worker's) moves ``now_ms`` with it."""
    clock, later = SystemClock(), LaterClock()
    before = to_ms(clock.now())
    ms = clock.now_ms()
    after = to_ms(clock.now())
    assert before <= ms <= after + 1  # +1: the datetime's float timestamp may round down
    ahead = later.now_ms() - clock.now_ms()
    assert 3_600_000 - 1_000 < ahead <= 3_600_000 + 1_000


async def test_rule_client_writes_go_to_the_inbox_and_only_the_actor_appends(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'inbox.db'}"

    def define(engine: ss.Engine) -> None:
        @engine.step("inbox.rule")
        async def handler(ctx: ss.StepContext) -> Any:
            ctx.on_signal("note", lambda payload: None)
            return await ctx.wait_for_event("go")

    worker = ss.Engine(url, poll_interval=0.01)
    define(worker)
    client = ss.Engine(url, workers=0)
    define(client)
    async with worker:
        handle = await client.start("inbox.rule")
        with anyio.fail_after(10):
            while "StepSuspended" not in await event_types(client, handle.execution_id):
                await anyio.sleep(0.01)
    before = await event_types(client, handle.execution_id)
    await handle.signal("note", {"n": 1})
    await handle.send_event("go", "payload")
    assert await event_types(client, handle.execution_id) == before  # nothing appended yet
    async with worker:
        assert await handle.result(timeout=10) == "payload"
    after = await event_types(client, handle.execution_id)
    assert after[len(before) :].count("SignalReceived") == 1
    assert after[len(before) :].count("EventReceived") == 1


async def test_rule_retry_is_a_new_attempt_against_current_state(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    seen: list[Any] = []
    bodies: list[str] = []

    def body(name: str) -> str:
        bodies.append(name)
        if name == "b" and bodies.count("b") == 1:
            raise ConnectionError("first call fails")
        return name

    @engine.step("retry.rule", max_retries=1, retry=FAST)
    async def handler(ctx: ss.StepContext) -> list[str]:
        seen.append(await ctx.get_state("x"))
        await ctx.set_state("x", ctx.info.attempt_number)
        a = await ctx.do("a", lambda: body("a"))
        b = await ctx.do("b", lambda: body("b"))
        return [a, b]

    async with engine:
        handle = await engine.start("retry.rule")
        assert await handle.result(timeout=10) == ["a", "b"]
    assert seen == [None, 1]  # the retry starts from the current state, not from scratch
    assert bodies == ["a", "b", "b"]  # completed sub-steps come from the record
    types = await event_types(engine, handle.execution_id)
    assert types.count("StateSet") == 2  # other operations append anew
    assert types.count("StepStarted") == 2


async def test_rule_only_the_lease_holder_appends_a_zombie_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'zombie.db'}"
    release = anyio.Event()
    started = anyio.Event()

    def define(engine: ss.Engine, *, zombie: bool) -> None:
        @engine.step("lease.rule")
        async def handler(ctx: ss.StepContext) -> str:
            await ctx.set_state("first", True)
            if zombie:
                started.set()
                await release.wait()  # paused past its lease while another worker takes over
            await ctx.set_state("second", "zombie" if zombie else "successor")
            return "zombie" if zombie else "successor"

    first = ss.Engine(url, poll_interval=0.01, lease_seconds=60)
    define(first, zombie=True)
    successor = ss.Engine(url, poll_interval=0.01, lease_seconds=60, clock=LaterClock())
    define(successor, zombie=False)
    with caplog.at_level(logging.WARNING, logger="stepsource.worker"):
        async with first:
            handle = await first.start("lease.rule")
            await started.wait()
            async with successor:
                assert await handle.result(timeout=10) == "successor"
            release.set()
            with anyio.fail_after(10):
                while first.live_executions():
                    await anyio.sleep(0.01)
    assert any("taken over by another worker" in r.getMessage() for r in caplog.records)
    types = await event_types(first, handle.execution_id)
    assert types.count("StepCompleted") == 1
    assert types.count("StepLeased") == 2
    assert await first.state_of(handle.execution_id) == {"first": True, "second": "successor"}


async def test_rule_priority_orders_leasing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'priority.db'}"
    order: list[str] = []

    def define(engine: ss.Engine) -> None:
        @engine.step("prio.rule")
        async def handler(ctx: ss.StepContext, name: str) -> None:
            order.append(name)

    client = ss.Engine(url, workers=0)
    define(client)
    for name, priority in [("low", 0), ("high", 10), ("mid", 5), ("urgent", 99)]:
        await client.start("prio.rule", {"name": name}, priority=priority)
    worker = ss.Engine(url, poll_interval=0.01, workers=1)
    define(worker)
    async with worker:
        with anyio.fail_after(10):
            while len(order) < 4:
                await anyio.sleep(0.01)
    assert order == ["urgent", "high", "mid", "low"]


async def test_rule_a_poison_execution_never_loops_hot_nor_blocks_others(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=2)
    poison_runs: list[int] = []

    @engine.step("poison", max_retries=3, retry=ss.RetryPolicy(initial=0.05, maximum=0.05))
    async def poison(ctx: ss.StepContext) -> None:
        poison_runs.append(ctx.info.attempt_number)
        raise RuntimeError("always")

    @engine.step("healthy")
    async def healthy(ctx: ss.StepContext, n: int) -> int:
        return n

    async with engine:
        bad = await engine.start("poison")
        good = [await engine.start("healthy", {"n": n}) for n in range(20)]
        assert [await h.result(timeout=10) for h in good] == list(range(20))
        with pytest.raises(ss.StepFailedError):
            await bad.result(timeout=10)
    assert poison_runs == [1, 2, 3, 4]  # max_retries + 1 attempts, then StepFailed


async def test_rule_an_incompatible_handler_version_does_not_resume_an_open_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'versions.db'}"
    paused = anyio.Event()

    def define(engine: ss.Engine, version: str, compatible: tuple[str, ...] = ()) -> None:
        @engine.step("versioned", version=version, compatible_with=compatible)
        async def handler(ctx: ss.StepContext) -> str:
            await ctx.set_state("v", version)
            if version == "1":
                paused.set()
                await anyio.sleep_forever()
            return version

    old = ss.Engine(url, poll_interval=0.01)
    define(old, "1")
    async with old:
        handle = await old.start("versioned")
        await paused.wait()
    before = await event_types(old, handle.execution_id)

    incompatible = ss.Engine(url, poll_interval=0.01, lease_seconds=0.3)  # parks for 0.3 s
    define(incompatible, "2")
    with caplog.at_level(logging.ERROR, logger="stepsource.worker"):
        async with incompatible:
            with anyio.fail_after(10):
                while not any("version '1'" in r.getMessage() for r in caplog.records):
                    await anyio.sleep(0.01)
    # refused before running anything: only the parking is recorded, once
    assert await event_types(old, handle.execution_id) == [*before, "StepParked"]

    compatible = ss.Engine(url, poll_interval=0.01, lease_seconds=0.5)
    define(compatible, "2", compatible=("1",))
    async with compatible:
        await compatible.release(handle.execution_id)  # the operator, once it is deployed
        assert await handle.result(timeout=10) == "2"


async def test_rule_a_client_starts_a_step_only_a_worker_registered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'published.db'}"
    worker = ss.Engine(url, poll_interval=0.01)

    @worker.step("remote.only", version="3.1", max_retries=2, priority=4)
    async def handler(ctx: ss.StepContext, count: int, label: str = "x") -> str:
        return f"{label}{count}"

    client = ss.Engine(url, workers=0)  # knows nothing of the step's code
    with pytest.raises(ss.UnknownStepError, match="nor published"):
        await client.start("remote.only", {"count": 1})
    async with worker:  # a worker publishes what it runs when it starts
        with pytest.raises(ss.InputValidationError, match="count"):
            await client.start("remote.only", {"count": "many"})
        with pytest.raises(ss.InputValidationError, match="count"):
            await client.start("remote.only", {"label": "y"})
        handle = await client.start("remote.only", {"count": 7})
        assert await handle.result(timeout=10) == "x7"
    record = await client.describe(handle.execution_id)
    assert (record.step_version, record.max_retries, record.priority) == ("3.1", 2, 4)


async def test_rule_a_finished_execution_left_in_the_queue_is_removed_not_leased_forever(
    backend_url: str,
) -> None:
    from stepsource.adapters.ports import QueueUpdate
    from stepsource.aggregates.execution import StepExecution

    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("queue.leftover")
    async def handler(ctx: ss.StepContext) -> int:
        return 1

    async with engine:
        handle = await engine.start("queue.leftover")
        assert await handle.result(timeout=10) == 1
    # as if the queue removal after the terminal commit had been lost (a crash on NATS)
    aggregate, _ = await engine.store.load(handle.execution_id)
    assert isinstance(aggregate, StepExecution)
    backend = engine._backend
    leftover = QueueUpdate(kind="enqueue", step_id="queue.leftover", due_ms=0)
    from stepsource.adapters.ports import Commit

    await backend.append(Commit(handle.execution_id, aggregate.version, (), queue=leftover))
    assert await backend.next_due_ms(["queue.leftover"]) is not None
    async with engine:
        with anyio.fail_after(10):
            while await backend.next_due_ms(["queue.leftover"]) is not None:
                await anyio.sleep(0.01)
    types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
    assert types.count("StepCompleted") == 1  # nothing appended by the clean-up
    assert types[-1] == "StepCompleted"


async def test_rule_a_scheduled_execution_whose_queue_entry_was_lost_is_requeued_by_a_restart(
    backend_url: str,
) -> None:
    from stepsource.adapters.ports import Commit, QueueUpdate

    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("requeue.me")
    async def handler(ctx: ss.StepContext) -> str:
        return "ran"

    chosen = "8c1d7e36-6a55-4d8b-9a2e-0f3b5c7d9e11"
    await engine.start("requeue.me", execution_id=chosen)
    # as if the queue entry had been lost with a crash after the commit (NATS writes it after)
    await engine._backend.append(Commit(chosen, 1, (), queue=QueueUpdate(kind="done")))
    assert await engine._backend.next_due_ms(["requeue.me"]) is None
    with pytest.raises(ss.VersionConflictError, match="already exists"):
        await engine.start("requeue.me", execution_id=chosen)  # a client retrying its start
    async with engine:
        assert await engine.get_handle(chosen).result(timeout=10) == "ran"
