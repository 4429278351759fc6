"""Continue-as-new: ``ctx.continue_as_new(input)`` ends a run and starts the next run of the
same step with an empty log; handles follow the chain, the link is shown both ways, a crash
between starting the successor and recording the end neither loses nor doubles it, and a
chain of runs ends as the same loop run in one execution would."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.continuation import latest_run
from stepsource.testing.processes import KILL_AT_ENV, WorkerProcesses, eventually

pytestmark = pytest.mark.anyio

DEADLINE = 30
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import continue_app  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fold(acc: int, op: int) -> int:
    return (acc * 31 + op) % 1_000_003


def define(engine: ss.Engine) -> None:
    @engine.step("can.fold")
    async def fold_ops(ctx: ss.StepContext, ops: list[int], acc: int = 0, per_run: int = 1) -> int:
        """Folds ``ops`` into ``acc``, ``per_run`` of them per run, continuing as new."""
        done = 0
        while ops and done < per_run:
            op = ops[0]
            acc = await ctx.do(f"op-{done}", lambda op=op, acc=acc: fold(acc, op))  # type: ignore[misc]
            await ctx.set_state("acc", acc)
            ops, done = ops[1:], done + 1
        if ops:
            await ctx.continue_as_new({"ops": ops, "acc": acc, "per_run": per_run})
        return acc

    @engine.step("can.poller")
    async def poller(ctx: ss.StepContext, round: int = 0) -> dict[str, Any]:
        """Waits for a signal each run; continues as new until it was told 'stop'."""
        got: list[Any] = []
        ctx.on_signal("say", got.append)
        ctx.on_query("round", lambda: round)
        await ctx.wait_for_condition(lambda: bool(got), timeout=60)
        if got[0] != "stop":
            await ctx.continue_as_new({"round": round + 1})
        return {"round": round}

    @engine.step("can.misuse")
    async def misuse(ctx: ss.StepContext, how: str) -> str:
        try:
            if how == "input":
                await ctx.continue_as_new({"nonsense": 1})
            elif how == "substep":

                async def inside() -> None:
                    await ctx.continue_as_new({"how": "x"})

                await ctx.do("inside", inside)
            elif how == "child":
                return str(await ctx.run_step("can.misuse", {"how": "input"}))
            elif how == "update":

                async def jump() -> None:
                    await ctx.continue_as_new({"how": "x"})

                done: list[int] = []
                ctx.on_update("jump", jump)
                ctx.on_signal("done", done.append)
                await ctx.wait_for_condition(lambda: bool(done), timeout=DEADLINE)
        except ss.StepsourceError as error:
            return f"{type(error).__name__}: {error}"
        return "no error"


async def test_a_loop_continues_as_new_and_handles_follow_the_chain(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    define(engine)
    async with engine:
        first = await engine.start("can.fold", {"ops": [3, 1, 4, 1]}, key="acct-9")
        expected = 0
        for op in [3, 1, 4, 1]:
            expected = fold(expected, op)
        assert await first.result(timeout=DEADLINE) == expected  # the chain's outcome
        runs = await engine.executions(step_id="can.fold")
        assert len(runs) == 4  # one run per op, each with its own short log
        # the business key stays with every run, so the key lists the chain
        assert {r.execution_id for r in await engine.executions(key="acct-9")} == {
            r.execution_id for r in runs
        }
        chain = [first.execution_id]
        while (record := await engine.describe(chain[-1])).continued_as is not None:
            successor = await engine.describe(record.continued_as)
            assert successor.continued_from == chain[-1]  # linked both ways
            chain.append(record.continued_as)
        assert len(chain) == 4
        assert record.output == expected
        assert await engine.state_of(chain[-1]) == {"acc": expected}
        for run in chain[:-1]:
            events = await engine.events(run)
            assert len(events) <= 8  # every run replays only its own few events
            assert isinstance(events[-1], ev.StepContinued)
            (entry,) = [h for h in await engine.history_of(run) if h.type == "continued"]
            assert entry.details["execution_id"] == chain[chain.index(run) + 1]
        for run in chain:  # each run replays against today's code without a divergence
            assert await engine.verify(run) is None
        # a handle of any run, and of the key, waits for the chain's end
        assert await engine.get_handle(chain[1]).result(timeout=DEADLINE) == expected
        assert await engine.handle_for_key("can.fold", "acct-9").result() == expected


async def test_messages_and_queries_to_a_continued_run_reach_the_chain_s_last_run(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    define(engine)
    async with engine:
        handle = await engine.start("can.poller", {})
        for expected_round in range(3):

            async def on_round(n: int = expected_round) -> bool:
                try:
                    return bool(await handle.query("round") == n)
                except ss.StepsourceError:
                    return False  # between runs: the next one has not started yet

            await eventually(f"round {expected_round}", on_round)
            await handle.signal("say", "more")  # sent to the first run: reaches the latest
        await eventually("round 3", lambda: _query_is(handle, 3))
        # a wait that runs out on a later run says the caller's timeout and both ids (it
        # said "within 0.00027 seconds", the rest left for the last run, naming only it)
        with pytest.raises(ss.ResultTimeout) as late:
            await handle.result(timeout=0.2)
        assert late.value.reason.startswith(
            "the execution did not finish within 0.2 seconds (it continued as new; its latest "
            "run is "
        )
        assert (late.value.execution_id, late.value.step_id) == (handle.execution_id, "can.poller")
        await handle.signal("say", "stop")
        assert await handle.result(timeout=DEADLINE) == {"round": 3}
        assert len(await engine.executions(step_id="can.poller")) == 4


async def test_an_update_handed_over_by_a_run_continuing_as_new_is_answered_by_its_successor(
    backend_url: str,
) -> None:
    """An update waiting in a run's inbox when the run continues as new goes to the successor
    with the rest of the inbox; the caller was told "the execution ended before update 'bump'
    ran" while the successor ran it (a retry would apply it twice)."""
    engine = ss.Engine(backend_url, poll_interval=0.01)
    entered, gate = threading.Event(), threading.Event()

    @engine.step("can.entity")
    async def entity(ctx: ss.StepContext, run: int = 0) -> dict[str, Any]:
        got: list[str] = []

        def bump(value: str) -> str:
            got.append(value)
            return f"run {run}: {value}"

        ctx.on_update("bump", bump)
        if run == 0:

            def hold() -> None:
                entered.set()
                gate.wait(DEADLINE)

            await ctx.do("hold", hold)  # the update arrives here, then the run continues
            await ctx.continue_as_new({"run": 1})
        await ctx.wait_for_condition(lambda: bool(got), timeout=DEADLINE)
        return {"run": run, "got": got}

    async with engine, anyio.create_task_group() as tg:
        handle = await engine.start("can.entity", {})
        await anyio.to_thread.run_sync(entered.wait, DEADLINE)
        answer: list[Any] = []

        async def update() -> None:
            answer.append(await handle.update("bump", "U", timeout=DEADLINE))

        tg.start_soon(update)
        backend = engine.store.backend
        with anyio.fail_after(DEADLINE):
            while not await backend.inbox(handle.execution_id):
                await anyio.sleep(0.01)
        gate.set()
        assert await handle.result(timeout=DEADLINE) == {"run": 1, "got": ["U"]}
    assert answer == ["run 1: U"]


def test_the_cli_cancels_and_signals_a_chain_through_its_first_run(tmp_path: Path) -> None:
    """``stepsource cancel`` of a chain's first run cancels its latest run, as
    ``handle.cancel()`` does (it refused: "already ended (completed)"), and the CLI names the
    run its messages reach (it named the first)."""
    url = f"sqlite:///{tmp_path / 'chain.db'}"

    async def second_round() -> tuple[str, str]:
        engine = ss.Engine(url, poll_interval=0.01)
        define(engine)
        async with engine:
            handle = await engine.start("can.poller", {})
            await handle.signal("say", "more")
            await eventually("round 1", lambda: _query_is(handle, 1))
            return handle.execution_id, await latest_run(engine.store, handle.execution_id)

    first, latest = anyio.run(second_round)
    assert latest != first
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
    stepsource = str(Path(sys.executable).parent / "stepsource")
    said = []
    for command in (["signal", first, "say", '"hello"'], ["cancel", first, "--reason", "done"]):
        done = subprocess.run(
            [stepsource, "--url", url, *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        said.append(" ".join(done.stdout.split()))
    assert f"to {latest} (the latest run of {first}, which continued as new)" in said[0]
    assert (
        f"asked {latest} (the latest run of {first}, which continued as new) to cancel" in (said[1])
    )

    async def outcome() -> str:
        engine = ss.Engine(url, poll_interval=0.01)
        define(engine)
        async with engine:
            with pytest.raises(ss.StepCancelledError):
                await engine.get_handle(first).result(timeout=DEADLINE)
            return (await engine.describe(await latest_run(engine.store, first))).status

    assert anyio.run(outcome) == "cancelled"


async def _query_is(handle: ss.ExecutionHandle[Any], value: int) -> bool:
    try:
        return bool(await handle.query("round") == value)
    except ss.StepsourceError:
        return False


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_refused_continue_appends_nothing_and_names_the_fix(
    backend: str, tmp_path: Path
) -> None:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 's.db'}"
    engine = ss.Engine(url, poll_interval=0.01)
    define(engine)
    async with engine:
        bad_input = await engine.start("can.misuse", {"how": "input"})
        message = str(await bad_input.result(timeout=DEADLINE))
        assert message.startswith("InputValidationError: continue_as_new input")
        assert bad_input.execution_id in message
        assert "'can.misuse'" in message
        assert "Pass the input the next run's handler takes" in message
        in_substep = await engine.start("can.misuse", {"how": "substep"})
        message = str(await in_substep.result(timeout=DEADLINE))
        assert "UsageError: continue_as_new refused: called inside ctx.do('inside')" in message
        assert "from the handler body" in message
        assert message.count(in_substep.execution_id) == 1  # named once, not per nesting
        in_update = await engine.start("can.misuse", {"how": "update"})
        with pytest.raises(ss.UpdateFailedError) as refused:
            await in_update.update("jump", timeout=DEADLINE)
        message = str(refused.value)
        # the handler's kind, not the engine's internal scope name ('update#7')
        assert "continue_as_new refused: called inside an update handler." in message
        assert message.count(in_update.execution_id) == 1
        await in_update.signal("done", 1)
        assert await in_update.result(timeout=DEADLINE) == "no error"
        in_child = await engine.start("can.misuse", {"how": "child"})
        message = str(await in_child.result(timeout=DEADLINE))
        assert "UsageError" in message
        assert "a child or a DAG flow" in message
        for handle in (bad_input, in_substep):
            events = await engine.events(handle.execution_id)
            assert not any(isinstance(e, ev.StepContinued) for e in events)
            assert isinstance(events[-1], ev.StepCompleted)
    # no successor of any of them was started: only the four runs and the child
    assert len(await engine.executions(step_id="can.misuse")) == 5


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.integers(min_value=-1000, max_value=1000), min_size=1, max_size=7),
    per_run=st.integers(min_value=1, max_value=3),
)
def test_property_a_chain_of_continues_ends_as_the_loop_in_one_run(
    ops: list[int], per_run: int
) -> None:
    """However the work is split into runs, the chain's last run ends with the output and
    state of the loop done in one run, and there are ceil(len / per_run) runs."""

    async def main() -> None:
        engine = ss.Engine("memory://", poll_interval=0.01)
        define(engine)
        async with engine:
            one = await engine.start("can.fold", {"ops": ops, "per_run": len(ops)})
            whole = await one.result(timeout=DEADLINE)
            chain = await engine.start("can.fold", {"ops": ops, "per_run": per_run})
            assert await chain.result(timeout=DEADLINE) == whole
            runs = await engine.executions(step_id="can.fold", limit=1000)
            assert len(runs) == 1 + -(-len(ops) // per_run)
            last = chain.execution_id
            while (record := await engine.describe(last)).continued_as is not None:
                last = record.continued_as
            assert await engine.state_of(last) == await engine.state_of(one.execution_id)
            assert await latest_run(engine.store, chain.execution_id) == last

    anyio.run(main)


async def test_the_last_run_of_a_long_chain_is_found_in_logarithmic_reads() -> None:
    """A client following a chain of 64 runs from the first reads about 2 log2(64) stream
    versions, not 64 logs: a loop that ran for months is found as fast as a new one."""
    engine = ss.Engine("memory://", poll_interval=0.01)
    define(engine)
    async with engine:
        first = await engine.start("can.fold", {"ops": list(range(64))})
        await first.result(timeout=DEADLINE)
        runs = await engine.executions(step_id="can.fold", limit=100)
        assert len(runs) == 64
        backend = engine.store.backend
        reads: list[str] = []
        real = backend.stream_version

        async def counted(stream_id: str) -> int:
            reads.append(stream_id)
            return await real(stream_id)

        backend.stream_version = counted  # type: ignore[method-assign]
        last = await latest_run(engine.store, first.execution_id)
        backend.stream_version = real  # type: ignore[method-assign]
        assert (await engine.describe(last)).continued_as is None
        assert last == runs[0].execution_id  # the newest run
        assert len(reads) <= 2 * 6 + 2


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        f"sqlite:///{tmp_path / 'steps.db'}",
        "continue_app:engine",
        pythonpath=[TESTS_DIR],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL"),
    ) as pool:
        yield pool


@pytest.mark.timeout(120)
async def test_a_worker_killed_between_the_successor_and_the_end_loses_and_doubles_nothing(
    workers: WorkerProcesses,
) -> None:
    """The first worker dies right after starting the successor, before the predecessor's
    StepContinued is recorded; another worker resumes: one successor, one end, one result."""
    client = continue_app.engine.derive(url=workers.url, workers=0)
    doomed = workers.spawn("doomed", kill_at="after-successor")
    await doomed.ready()
    async with client:
        handle = await client.start("can.count", {"n": 0, "upto": 3})
        assert await doomed.exited() < 0  # SIGKILLed at the point
        survivor = workers.spawn("survivor")
        assert await handle.result(timeout=DEADLINE) == 0 + 1 + 2
        runs = await client.executions(step_id="can.count")
        assert len(runs) == 3, runs
        ends: Counter[str] = Counter()
        for run in runs:
            events = await client.events(run.execution_id)
            ends.update(type(e).__name__ for e in events if isinstance(e, ev.StepCompleted))
            starts = [e for e in events if isinstance(e, ev.StepScheduled)]
            assert len(starts) == 1
        assert ends == {"StepContinued": 2, "StepCompleted": 1}
        first = await client.describe(handle.execution_id)
        assert first.continued_as is not None
        assert (await client.describe(first.continued_as)).continued_from == handle.execution_id
        await survivor.terminate()
    await client.aclose()
