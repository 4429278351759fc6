"""Suspension (sleep, wait_for_event, wait_for_condition) and client messages (signals,
queries, updates, events, cancellation)."""

from __future__ import annotations

import datetime
import functools
import re
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


async def event_types(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


async def wait_until_suspended(engine: ss.Engine, execution_id: str, count: int = 1) -> None:
    with anyio.fail_after(10):
        while (await event_types(engine, execution_id)).count("StepSuspended") < count:
            await anyio.sleep(0.01)


async def test_sleep_suspends_without_a_worker_and_resumes_when_the_timer_fires(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    runs: list[int] = []

    @engine.step("wait.sleep")
    async def handler(ctx: ss.StepContext) -> str:
        runs.append(1)
        await ctx.set_state("phase", "before")
        await ctx.sleep(2.0)  # long enough to look at it while it waits, under load too
        await ctx.set_state("phase", "after")
        return "woke"

    async with engine:
        handle = await engine.start("wait.sleep")
        await wait_until_suspended(engine, handle.execution_id)
        with anyio.fail_after(1.5):  # the actor lets go just after its suspension's commit
            while engine.live_executions():  # no task, no aggregate while it waits
                await anyio.sleep(0.01)
        assert (await engine.describe(handle.execution_id)).status == "waiting"
        assert await handle.result(timeout=10) == "woke"
    types = await event_types(engine, handle.execution_id)
    assert types.count("TimerStarted") == 1
    assert types.count("TimerFired") == 1
    assert types.count("StateSet") == 2  # the replay after waking matched "before"
    assert len(runs) == 2


def approval_engine(url: str) -> ss.Engine:
    """The document approval flow: signal + query + wait_for_condition."""
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("documentApproval")
    async def approval(ctx: ss.StepContext, documentId: str, reviewerId: str) -> dict[str, Any]:
        await ctx.set_state(
            "approvalState",
            {"status": "PENDING", "document": documentId, "assignedTo": reviewerId, "comments": []},
        )

        async def decide(decision: dict[str, Any]) -> None:
            state = await ctx.get_state("approvalState")
            status = "APPROVED" if decision["approved"] else "REJECTED"
            comments = [*state["comments"], {"text": decision["comment"]}]
            await ctx.set_state("approvalState", {**state, "status": status, "comments": comments})

        async def current() -> Any:
            return await ctx.get_state("approvalState")

        async def pending_done() -> bool:
            state = await ctx.get_state("approvalState")
            return bool(state["status"] != "PENDING")

        ctx.on_signal("approvalDecision", decide)
        ctx.on_query("getApprovalState", current)
        await ctx.wait_for_condition(pending_done)
        final = await ctx.get_state("approvalState")
        return {
            "documentId": documentId,
            "approved": final["status"] == "APPROVED",
            "comments": final["comments"],
        }

    return engine


async def test_document_approval_with_signal_query_and_condition(backend_url: str) -> None:
    engine = approval_engine(backend_url)
    async with engine:
        handle = await engine.start("documentApproval", {"documentId": "d-1", "reviewerId": "r-9"})
        await wait_until_suspended(engine, handle.execution_id)
        state = await handle.query("getApprovalState")
        assert state["status"] == "PENDING"
        await handle.signal("approvalDecision", {"approved": True, "comment": "LGTM"})
        result = await handle.result(timeout=10)
    assert result == {"documentId": "d-1", "approved": True, "comments": [{"text": "LGTM"}]}
    types = await event_types(engine, handle.execution_id)
    assert types.count("SignalReceived") == 1
    assert types.count("WaitSatisfied") == 1
    assert "UpdateAccepted" not in types
    assert (await handle.query("getApprovalState"))["status"] == "APPROVED"


async def test_queries_record_nothing(backend_url: str) -> None:
    engine = approval_engine(backend_url)
    async with engine:
        handle = await engine.start("documentApproval", {"documentId": "d-2", "reviewerId": "r"})
        await wait_until_suspended(engine, handle.execution_id)
        before = await event_types(engine, handle.execution_id)
        for _ in range(3):
            await handle.query("getApprovalState")
        assert await event_types(engine, handle.execution_id) == before
        with pytest.raises(ss.UnknownQueryError, match="nope"):
            await handle.query("nope")
        await handle.cancel("no longer needed")
        with pytest.raises(ss.StepCancelledError, match="no longer needed"):
            await handle.result(timeout=10)


async def test_wait_for_event_returns_the_payload_and_events_sent_early_are_kept(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    gate = anyio.Event()

    @engine.step("wait.event")
    async def handler(ctx: ss.StepContext) -> list[Any]:
        await gate.wait()  # the "early" event is sent while the handler runs
        first = await ctx.wait_for_event("scan")
        second = await ctx.wait_for_event("scan")
        return [first, second]

    async with engine:
        handle = await engine.start("wait.event")
        await handle.send_event("scan", {"n": 1})
        gate.set()
        await wait_until_suspended(engine, handle.execution_id)
        await handle.send_event("scan", {"n": 2})
        assert await handle.result(timeout=10) == [{"n": 1}, {"n": 2}]
    types = await event_types(engine, handle.execution_id)
    assert types.count("EventReceived") == 2
    assert types.count("WaitSatisfied") == 2


async def test_a_wait_that_times_out_is_recorded_then_raised(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("wait.timeout")
    async def handler(ctx: ss.StepContext) -> str:
        try:
            await ctx.wait_for_event("never", timeout=0.2)
        except TimeoutError:  # WaitTimeout is a TimeoutError too
            return "timed out"
        return "arrived"

    async with engine:
        handle = await engine.start("wait.timeout")
        assert await handle.result(timeout=10) == "timed out"
    assert (await event_types(engine, handle.execution_id)).count("WaitTimedOut") == 1


async def test_updates_run_their_handler_and_return_its_recorded_result(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("cart")
    async def cart(ctx: ss.StepContext) -> list[str]:
        async def add(item: str) -> list[str]:
            items = [*(await ctx.get_state("cartItems", [])), item]
            await ctx.set_state("cartItems", items)
            return items

        ctx.on_update("addItemToCart", add)
        await ctx.wait_for_event("checkout")
        return list(await ctx.get_state("cartItems", []))

    async with engine:
        handle = await engine.start("cart")
        await wait_until_suspended(engine, handle.execution_id)
        assert await handle.update("addItemToCart", "productXYZ", timeout=10) == ["productXYZ"]
        assert await handle.update("addItemToCart", "other", timeout=10) == ["productXYZ", "other"]
        with pytest.raises(
            ss.UpdateFailedError,
            match=re.escape("no update handler named 'missing' (registered: addItemToCart)"),
        ):
            await handle.update("missing", timeout=10)
        # a payload that cannot be recorded is named as the caller passed it
        with pytest.raises(ss.StateValueError) as refused:
            await handle.signal("note", {"at": datetime.date(2026, 1, 1)})
        assert (
            refused.value.reason == "the signal's payload['at'] is a date, which is not strict JSON"
        )
        assert refused.value.step_id == "cart"
        await handle.send_event("checkout")
        assert await handle.result(timeout=10) == ["productXYZ", "other"]


async def test_messages_to_a_finished_execution_are_refused(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("quick")
    async def quick(ctx: ss.StepContext) -> int:
        return 1

    async with engine:
        handle = await engine.start("quick")
        await handle.result(timeout=10)
        for send in (handle.signal("s"), handle.send_event("e"), handle.cancel()):
            with pytest.raises(ss.UsageError, match="already ended"):
                await send


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda ctx: ctx.on_signal("approve", 5), "ctx.on_signal('approve', ...) needs a function"),
        (
            lambda ctx: ctx.on_query("", lambda: 1),
            "the query name must be a non-empty str, not an empty one",
        ),
        (
            lambda ctx: ctx.on_update(7, lambda: 1),
            "the update name must be a non-empty str, not int",
        ),
        (
            lambda ctx: ctx.wait_for_event("", timeout=5),
            "an event name must be a non-empty str, not an empty one",
        ),
        # "no timeout" written as infinity: refused, pointing to None (it said "not >= 0")
        (
            lambda ctx: ctx.wait_for_event("e", timeout=float("inf")),
            "timeout must be a number of seconds from 0 to 10**9 (about 31 years), not inf. "
            "Leave the timeout out (None) to wait without one",
        ),
        # the condition's value instead of a function: a TypeError when it was checked
        (
            lambda ctx: ctx.wait_for_condition(True, timeout=5),
            "wait_for_condition() needs a function that says whether to go on, not a bool",
        ),
    ],
)
async def test_a_message_name_or_handler_no_client_could_use_is_refused_at_once(
    call: Any, words: str
) -> None:
    """Names are checked as a client's are, and a handler must be callable: the mistake fails
    the step where it is made, with nothing recorded for it, instead of when a message comes
    (a signal handler that is not a function) or never (a wait for a name nobody can send)."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("wait.misuse")
    async def misuse(ctx: ss.StepContext) -> None:
        await ctx.set_state("before", True)
        made = call(ctx)
        if made is not None:
            await made

    async with engine:
        handle = await engine.start("wait.misuse")
        with pytest.raises(ss.StepFailedError, match=re.escape("UsageError: " + words)):
            await handle.result(timeout=10)
    kinds = await event_types(engine, handle.execution_id)
    assert "EventAwaited" not in kinds
    assert "StepSuspended" not in kinds


async def test_many_suspended_executions_hold_no_live_actor_and_each_resumes(
    backend_url: str, anyio_backend: str
) -> None:
    # the full count once per backend (PostgreSQL: the suite's time budget allows 200; the
    # count is a scale check, the behaviour is the same at 200)
    full = anyio_backend == "asyncio" and not backend_url.startswith("postgresql")
    count = 2000 if full else 200
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=4)

    @engine.step("wait.many")
    async def handler(ctx: ss.StepContext, n: int) -> int:
        payload = await ctx.wait_for_event("go")
        return int(payload) + n

    async with engine:
        handles = [await engine.start("wait.many", {"n": n}) for n in range(count)]
        with anyio.fail_after(60):
            while len(await engine.executions(status="waiting", limit=count)) < count:
                await anyio.sleep(0.05)
        assert engine.live_executions() == []
        for handle in handles:
            await handle.send_event("go", 1000)
        results = [await handle.result(timeout=60) for handle in handles]
    assert results == [1000 + n for n in range(count)]


def batch_engine(url: str, **options: Any) -> ss.Engine:
    """A counter whose signal and update handlers each record a state write and a body."""
    engine = ss.Engine(url, poll_interval=0.01, **options)

    @engine.step("wait.batch")
    async def counter(ctx: ss.StepContext) -> dict[str, Any]:
        seen: list[int] = []

        async def add(amount: int) -> int:
            await ctx.do(f"log-{len(seen)}", lambda: amount)
            seen.append(amount)
            await ctx.set_state("seen", list(seen))
            return len(seen)

        ctx.on_signal("add", add)
        ctx.on_update("add", add)
        ctx.on_query("seen", lambda: list(seen))
        await ctx.wait_for_condition(lambda: sum(seen) >= 100)
        return {"seen": seen, "state": await ctx.get_state("seen")}

    return engine


@pytest.mark.parametrize("updates", [False, True])
async def test_messages_recorded_in_one_batch_are_each_delivered_again_on_resume(
    tmp_path: Any, updates: bool
) -> None:
    """Messages that wait in the inbox together are recorded together, then their handlers
    run one after the other; a resume (and a query, which is a replay) delivers each of them
    again in that order. It used to deliver only the first: matching its handler's
    operations folded the others in, their handlers' records were left over and the
    execution was parked as nondeterministic."""
    url = f"sqlite:///{tmp_path / 'batch.db'}"
    engine = batch_engine(url)
    async with engine:
        handle = await engine.start("wait.batch")
        await wait_until_suspended(engine, handle.execution_id)
    client = batch_engine(url, workers=0)  # nothing pulls the inbox while they arrive
    async with anyio.create_task_group() as tg:
        for amount in (1, 2, 3):
            if updates:
                tg.start_soon(functools.partial(handle_of(client, handle).update, "add", amount))
                await anyio.sleep(0.05)  # accepted in this order
            else:
                await handle_of(client, handle).signal("add", amount)
        worker = batch_engine(url)
        async with worker:
            await wait_until_suspended(worker, handle.execution_id, count=2)
            mine = handle_of(worker, handle)
            assert await mine.query("seen") == [1, 2, 3]
            assert await worker.state_of(handle.execution_id) == {"seen": [1, 2, 3]}
            await mine.signal("add", 94)
            assert await mine.result(timeout=10) == {"seen": [1, 2, 3, 94], "state": [1, 2, 3, 94]}
    await client.aclose()
    types = await event_types(worker, handle.execution_id)
    assert "StepParked" not in types
    received = "UpdateAccepted" if updates else "SignalReceived"
    first = types.index(received)
    assert types[first : first + 3] == [received] * 3  # one batch, recorded before its handlers


def handle_of(engine: ss.Engine, handle: ss.ExecutionHandle[Any]) -> ss.ExecutionHandle[Any]:
    return engine.get_handle(handle.execution_id)


async def test_an_update_whose_result_the_log_cannot_hold_fails_alone() -> None:
    """The update fails with the reason (as when its handler raises); the execution goes
    on. It used to fail the execution, and the client heard it ended before the update."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("wait.tags")
    async def tags(ctx: ss.StepContext) -> str:
        done: list[int] = []
        ctx.on_update("tags", lambda: {"a", "b"})  # a set: not JSON

        def deep() -> list[Any]:
            value: list[Any] = []
            for _ in range(300):  # nested past the depth limit
                value = [value]
            return value

        ctx.on_update("deep", deep)
        ctx.on_signal("done", lambda _: done.append(1))
        await ctx.wait_for_condition(lambda: bool(done))
        return "finished"

    async with engine:
        handle = await engine.start("wait.tags")
        await wait_until_suspended(engine, handle.execution_id)
        with pytest.raises(ss.UpdateFailedError, match="StateValueError: the update's result"):
            await handle.update("tags", timeout=10)
        with pytest.raises(ss.UpdateFailedError, match="update 'deep' failed"):
            await handle.update("deep", timeout=10)
        await handle.signal("done")
        assert await handle.result(timeout=10) == "finished"


async def test_a_condition_predicate_that_records_is_refused_at_once() -> None:
    """A predicate runs only live (a replay reads the recorded end of the wait), so what it
    recorded was left over on the next resume and the execution was parked; it is refused
    the first time, as a query handler that records is."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("wait.recording")
    async def recording(ctx: ss.StepContext) -> None:
        async def check() -> bool:
            await ctx.set_state("checks", 1)
            return False

        await ctx.wait_for_condition(check)

    async with engine:
        handle = await engine.start("wait.recording")
        with pytest.raises(
            ss.StepFailedError,
            match="set_state was called by a wait_for_condition predicate, which reads and never",
        ):
            await handle.result(timeout=10)


async def test_sleep_without_seconds_is_a_usage_error() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("wait.none")
    async def none(ctx: ss.StepContext) -> None:
        await ctx.sleep(None)  # type: ignore[arg-type]

    async with engine:
        handle = await engine.start("wait.none")
        with pytest.raises(ss.StepFailedError, match="UsageError: sleep must be a number of"):
            await handle.result(timeout=10)


async def test_a_handle_sending_messages_at_once_still_sees_the_end(tmp_path: Path) -> None:
    """Each message a handle sends first reads what the execution appended since its last
    look; looks made at once each moved the handle on by what they read, past the log's end,
    and result() then never read the terminal event: it timed out on a completed execution
    (a fresh handle returned at once)."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    worker = ss.Engine(url, poll_interval=0.01)
    client = ss.Engine(url, workers=0, poll_interval=0.01)
    for engine in (worker, client):

        @engine.step("wait.tally")
        async def tally(ctx: ss.StepContext, stop_at: int) -> int:
            got: list[int] = []
            ctx.on_signal("n", got.append)
            for n in range(3):  # events before the signals, which every look reads
                await ctx.set_state("n", n)
            await ctx.wait_for_condition(lambda: len(got) >= stop_at, timeout=60)
            return len(got)

    async with worker, client:
        handle = await client.start("wait.tally", {"stop_at": 10})
        await wait_until_suspended(client, handle.execution_id)
        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(handle.signal, "n", n)
        assert await handle.result(timeout=30) == 10


async def test_messages_sent_while_the_last_body_runs_are_delivered_before_the_end(
    backend_url: str,
) -> None:
    """A handler's end is its last wait point: a signal and an update sent while its last
    ``ctx.do`` ran were left in the inbox (the signal lost without a word, the update refused
    as "ended before it ran"); they are delivered before the end is recorded, and a query's
    replay of the ended execution delivers them again."""
    engine = ss.Engine(backend_url, poll_interval=0.01)
    entered, gate = threading.Event(), threading.Event()

    @engine.step("wait.late")
    async def late(ctx: ss.StepContext) -> list[str]:
        got: list[str] = []
        ctx.on_signal("note", got.append)

        def add(value: str) -> int:
            got.append(value)
            return len(got)

        ctx.on_update("add", add)
        ctx.on_query("got", lambda: list(got))

        def hold() -> None:
            entered.set()
            gate.wait(30)

        await ctx.do("hold", hold)
        return got

    async with engine, anyio.create_task_group() as tg:
        handle = await engine.start("wait.late")
        await anyio.to_thread.run_sync(entered.wait, 30)
        await handle.signal("note", "S")
        answers: list[Any] = []

        async def update() -> None:
            answers.append(await handle.update("add", "U", timeout=30))

        tg.start_soon(update)
        with anyio.fail_after(30):
            while len(await engine.store.backend.inbox(handle.execution_id)) < 2:
                await anyio.sleep(0.01)
        gate.set()
        assert await handle.result(timeout=30) == ["S", "U"]
    assert answers == [2]
    assert (await event_types(engine, handle.execution_id))[-4:] == [
        "SignalReceived",
        "UpdateAccepted",
        "UpdateCompleted",
        "StepCompleted",
    ]
    assert await handle.query("got") == ["S", "U"]
    assert await engine.store.backend.inbox(handle.execution_id) == []


async def test_a_query_where_the_step_is_not_registered_names_the_execution_and_why(
    tmp_path: Path,
) -> None:
    """A query replays the handler in the asking process: one that does not register the
    step is told so, with the execution (it was told to import the step "before starting
    it", naming no execution)."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("wait.asked")
    async def asked(ctx: ss.StepContext) -> None:
        ctx.on_query("phase", lambda: "waiting")
        await ctx.wait_for_event("go", timeout=60)

    client = ss.Engine(url, workers=0)
    async with engine, client:
        handle = await engine.start("wait.asked")
        await wait_until_suspended(engine, handle.execution_id)
        assert await handle.query("phase") == "waiting"
        with pytest.raises(ss.UnknownStepError) as unknown:
            await client.get_handle(handle.execution_id).query("phase")
        assert unknown.value.execution_id == handle.execution_id
        assert unknown.value.hint is not None
        assert "before querying it: a query replays the handler" in unknown.value.hint
        await handle.send_event("go")
        await handle.result(timeout=30)


@pytest.mark.parametrize("late", ["signal", "cancel"])
async def test_a_handler_that_returned_is_not_undone_by_a_late_message(
    backend_url: str, late: str
) -> None:
    """The end's delivery takes signals and updates only: after ctx.complete() it takes
    none (a late signal failed the execution: "receiving a message refused: ctx.complete()
    was already called"), and a cancel found there leaves the handler's end as it is."""
    engine = ss.Engine(backend_url, poll_interval=0.01)
    entered, gate = threading.Event(), threading.Event()

    @engine.step("wait.done")
    async def done(ctx: ss.StepContext, completes: bool) -> dict[str, bool]:
        ctx.on_signal("note", lambda payload: None)

        def hold() -> None:
            entered.set()
            gate.wait(30)

        await ctx.do("hold", hold)
        if completes:
            await ctx.complete({"done": True})
        return {"done": True}

    async with engine:
        for completes in (True, False):
            entered.clear()
            gate.clear()
            handle = await engine.start("wait.done", {"completes": completes})
            await anyio.to_thread.run_sync(entered.wait, 30)
            if late == "signal":
                await handle.signal("note", 1)
            else:
                await handle.cancel("too late")
            with anyio.fail_after(30):
                while not await engine.store.backend.inbox(handle.execution_id):
                    await anyio.sleep(0.01)
            gate.set()
            assert await handle.result(timeout=30) == {"done": True}
            assert (await engine.describe(handle.execution_id)).status == "completed"
