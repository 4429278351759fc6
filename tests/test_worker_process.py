"""Durability across real processes: ``stepsource worker`` subprocesses sharing a SQLite file.

Each test starts executions from a pure client (``workers=0``) in this process and runs them
in ``python -m stepsource worker worker_app:engine`` subprocesses that get killed
(``STEPSOURCE_TEST_KILL_AT``), stopped with SIGTERM, or frozen with SIGSTOP past their lease.
What the tests look at is what a user can see: the log (``engine.events``), the projections,
the result, the workers' exit codes and stderr, and a side-effect file to which every sub-step
body appends one line, so the number of times each body ran can be counted. Every wait polls
an observable condition against a bounded deadline; nothing asserts wall-clock times.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.testing.processes import (
    KILL_AT_ENV,
    WorkerProcess,
    WorkerProcesses,
    eventually,
)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import worker_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(120)]

#: generous bounds for one process to start, lease, run or stop on a loaded 2-core machine
DEADLINE = 30.0
#: SIGTERM must stop a worker within this bound (the contract says "a few seconds")
STOP_DEADLINE = 15.0
ITEMS = [1, 2, 3, 4]
SUBSTEPS = [f"item-{i}" for i in range(len(ITEMS))]
TAKEN_OVER = "was taken over by another worker"


@pytest.fixture
def anyio_backend() -> str:
    """Process behaviour does not depend on the client's event loop: asyncio only."""
    return "asyncio"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'steps.db'}"  # an absolute path: sqlite:////...


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[WorkerProcesses]:
    """``stepsource worker worker_app:engine --workers 2`` processes; leftovers killed."""
    with WorkerProcesses(
        tmp_path,
        db_url,
        "worker_app:engine",
        pythonpath=[TESTS_DIR],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL", "WORKER_APP_BLOCK"),
        env={"WORKER_APP_LOG_TO_STDERR": "1"},
    ) as pool:
        yield pool


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[ss.Engine]:
    """A pure client with worker_app's steps registered (it validates input locally)."""
    engine = worker_app.engine.derive(url=db_url, workers=0)
    try:
        yield engine
    finally:
        await engine.aclose()


# -- helpers -----------------------------------------------------------------------------------
def ran(effects: Path) -> list[str]:
    """The side-effect file's lines: one per sub-step body run, in order."""
    return effects.read_text().splitlines() if effects.exists() else []


def names(events: Sequence[Any], kind: type[Any]) -> list[str]:
    return [type(e).__name__ for e in events if isinstance(e, kind)]


def identity(events: Sequence[Any]) -> list[tuple[str, int, Any]]:
    """What pins each event: its type, version and own timestamp."""
    return [(type(e).__name__, e.originator_version, e.timestamp) for e in events]


def assert_log_is_sound(events: Sequence[Any]) -> None:
    """Versions 1..N without gaps, no operation recorded twice, one terminal event, last."""
    assert [e.originator_version for e in events] == list(range(1, len(events) + 1))
    ops = [
        (e.attempt, e.scope, e.seq, e.name if isinstance(e, ev.SubStepCompleted) else None)
        for e in events
        if isinstance(e, ev.Recorded)
    ]
    duplicates = [op for op, n in Counter(ops).items() if n > 1]
    assert not duplicates, f"operations recorded twice: {duplicates}"
    done = Counter(e.name for e in events if isinstance(e, ev.SubStepCompleted))
    assert all(n == 1 for n in done.values()), f"a sub-step result was recorded twice: {done}"
    terminal = [e for e in events if isinstance(e, (ev.StepCompleted, ev.StepFailed))]
    assert len(terminal) == 1, terminal
    assert isinstance(terminal[0], ev.StepCompleted), terminal
    assert events[-1] is terminal[0], "events were appended after StepCompleted"
    assert not names(events, ev.AttemptFailed), "a crash or a stop must not fail the attempt"
    assert len(names(events, ev.StepStarted)) == 1, "a resume continues the same attempt"


def _without(details: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in details.items() if k not in keys}


async def outcome(engine: ss.Engine, execution_id: str) -> dict[str, Any]:
    """State, history and checkpoints, minus what differs from run to run (worker, uuids)."""
    history = await engine.history_of(execution_id)
    checkpoints = await engine.checkpoints_of(execution_id)
    return {
        "state": await engine.state_of(execution_id),
        "history": [(h.type, _without(h.details, "worker_id", "checkpoint_id")) for h in history],
        "checkpoints": [
            (c.metadata, c.state, c.cursor, c.items_processed, c.accumulated_results)
            for c in checkpoints
        ],
    }


async def reference_run(step_id: str, data: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The same step and input run once uninterrupted, in this process, on a memory log."""
    engine = worker_app.engine.derive(url="memory://", workers=1)
    async with engine:
        handle = await engine.start(step_id, data)
        output = await handle.result(timeout=DEADLINE)
    return output, await outcome(engine, handle.execution_id)


# -- 1. SIGKILL at deterministic points ------------------------------------------------------
#: where worker 1 dies -> the event the log ends with then, and the sub-steps recorded by then,
#: under the default durability: state writes and checkpoints wait in the buffer for the next
#: boundary (a ctx.do result, the sleep), so a commit ends with a sub-step's result
KILLS_AT_BOUNDARIES: dict[str, tuple[str, list[str]]] = {
    "before-first-append": ("StepScheduled", []),
    # item-1's side effect done, its result not recorded, nor item-0's state update after it
    "after-substep-body:2": ("SubStepCompleted", ["item-0"]),
    # the 2nd commit of the attempt: item-0's state update with item-1's result
    "after-record:2": ("SubStepCompleted", ["item-0", "item-1"]),
    # suspended in a ctx.sleep after item-1: the lease given up
    "inside-wait": ("StepSuspended", ["item-0", "item-1"]),
}
#: the same with every operation committed on its own (durability="each")
KILLS_EACH: dict[str, tuple[str, list[str]]] = {
    # leased, not a single event of its own recorded
    "before-first-append": ("StepScheduled", []),
    # item-1's side effect done, its result not recorded
    "after-substep-body:2": ("StateUpdated", ["item-0"]),
    # the 3rd commit of the attempt: item-1's result
    "after-record:3": ("SubStepCompleted", ["item-0", "item-1"]),
    # the 5th: the checkpoint after item-1
    "after-record:5": ("CheckpointCreated", ["item-0", "item-1"]),
    # suspended in a ctx.sleep after item-1: the lease given up
    "inside-wait": ("StepSuspended", ["item-0", "item-1"]),
}


KILLS = [("wp.durable", k, v) for k, v in KILLS_AT_BOUNDARIES.items()] + [
    ("wp.durable.each", k, v) for k, v in KILLS_EACH.items()
]


@pytest.mark.parametrize(("step_id", "kill_at", "expected_log"), KILLS)
async def test_a_worker_killed_at_a_fault_point_is_resumed_by_another_exactly_once(
    step_id: str,
    kill_at: str,
    expected_log: tuple[str, list[str]],
    tmp_path: Path,
    workers: WorkerProcesses,
    client: ss.Engine,
) -> None:
    effects = tmp_path / "effects.txt"
    data: dict[str, Any] = {"effects": str(effects), "items": ITEMS}
    if kill_at == "inside-wait":
        data["nap"] = 0.2  # a durable ctx.sleep after item-1
    expected_output, expected = await reference_run(
        step_id, {**data, "effects": str(tmp_path / "reference-effects.txt")}
    )

    handle = await client.start(step_id, data)
    w1 = workers.spawn("w1", lease_seconds=1, kill_at=kill_at)
    assert await w1.exited() == -signal.SIGKILL, w1.output()

    at_kill = await client.events(handle.execution_id)
    ran_at_kill = Counter(ran(effects))
    recorded_at_kill = [e.name for e in at_kill if isinstance(e, ev.SubStepCompleted)]
    assert not names(at_kill, ev.StepCompleted), "worker 1 died before the step could complete"
    last, recorded = expected_log
    assert type(at_kill[-1]).__name__ == last, at_kill
    assert recorded_at_kill == recorded
    if kill_at == "before-first-append":
        assert len(at_kill) == 1
        assert not ran_at_kill
    if kill_at.startswith("after-substep-body"):
        assert ran_at_kill == Counter({"item-0": 1, "item-1": 1}), "item-1's effect was done"

    w2 = workers.spawn("w2", lease_seconds=1)
    with anyio.fail_after(DEADLINE + 5):
        output = await handle.result(timeout=DEADLINE)
    final = await client.events(handle.execution_id)
    assert await w2.terminate(STOP_DEADLINE) == 0, w2.output()

    # exactly once, and the crashed worker's records kept as they were
    assert_log_is_sound(final)
    assert identity(final[: len(at_kill)]) == identity(at_kill)
    assert sorted(e.name for e in final if isinstance(e, ev.SubStepCompleted)) == SUBSTEPS
    w1_ids = {e.worker_id for e in at_kill if isinstance(e, ev.StepLeased)}
    later = [e for e in final[len(at_kill) :] if isinstance(e, ev.StepLeased)]
    assert later, "worker 2 leased the execution"
    assert all(e.attempt == 1 for e in later)
    w2_ids = {e.worker_id for e in later}
    assert len(w2_ids) == 1
    assert not w1_ids & w2_ids

    # no recorded body ran again; the one killed between effect and record ran once more
    ran_final = Counter(ran(effects))
    for name in SUBSTEPS:
        assert ran_at_kill[name] <= 1
        again = 0 if name in recorded_at_kill else 1
        assert ran_final[name] == ran_at_kill[name] + again, (name, ran_at_kill, ran_final)
        assert ran_final[name] <= 2

    # the same result as an uninterrupted run
    assert output == expected_output == {"total": 30, "squares": [1, 4, 9, 16]}
    assert await outcome(client, handle.execution_id) == expected


async def test_an_idempotency_key_reaches_every_run_of_a_body_killed_midway(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    """``key = await ctx.uuid4()`` then ``ctx.do("charge", ... key ...)``: the worker is
    SIGKILLed after the charge's side effect, before its result is recorded; the body runs
    again on another worker with the same key (the recorded value was durable first)."""
    effects = tmp_path / "effects.txt"
    handle = await client.start("wp.idempotent", {"effects": str(effects)})
    w1 = workers.spawn("w1", lease_seconds=1, kill_at="after-substep-body")
    assert await w1.exited() == -signal.SIGKILL, w1.output()
    at_kill = await client.events(handle.execution_id)
    assert names(at_kill, ev.ValueRecorded) == ["ValueRecorded"]
    assert not names(at_kill, ev.SubStepCompleted)
    w2 = workers.spawn("w2", lease_seconds=1)
    key = await handle.result(timeout=DEADLINE)
    assert await w2.terminate(STOP_DEADLINE) == 0, w2.output()
    assert ran(effects) == [f"charge {key}", f"charge {key}"]  # at least once, one key
    assert await client.state_of(handle.execution_id) == {"phase": "charging"}
    assert_log_is_sound(await client.events(handle.execution_id))


async def test_a_timed_out_wait_keeps_its_branch_when_the_event_arrives_during_a_crash(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    """The wait times out, the escalation body runs and the worker is SIGKILLed before its
    result is recorded; the awaited event arrives meanwhile. The resumed run replays the
    recorded timeout and escalates again: the late event never turns it into an approval."""
    effects = tmp_path / "effects.txt"
    handle = await client.start("wp.escalate", {"effects": str(effects)})
    w1 = workers.spawn("w1", lease_seconds=1, kill_at="after-substep-body")
    assert await w1.exited() == -signal.SIGKILL, w1.output()
    assert names(await client.events(handle.execution_id), ev.WaitTimedOut) == ["WaitTimedOut"]
    await handle.send_event("approve", {"by": "late"})
    w2 = workers.spawn("w2", lease_seconds=1)
    assert await handle.result(timeout=DEADLINE) == "escalated"
    assert await w2.terminate(STOP_DEADLINE) == 0, w2.output()
    assert ran(effects) == ["escalate", "escalate"]
    final = await client.events(handle.execution_id)
    assert names(final, ev.WaitTimedOut) == ["WaitTimedOut"]
    assert not names(final, ev.WaitSatisfied)
    assert_log_is_sound(final)


# -- 2. SIGTERM is graceful ------------------------------------------------------------------
async def test_sigterm_releases_the_lease_so_another_worker_resumes_at_once(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    effects = tmp_path / "effects.txt"
    # leases far longer than the deadlines below: only a released lease lets w2 in in time
    w1 = workers.spawn("w1", lease_seconds=60, env={"WORKER_APP_BLOCK": "async"})
    await w1.ready()
    handle = await client.start("wp.blocking", {"effects": str(effects)})

    async def blocked() -> bool:
        return "wait" in ran(effects)

    await eventually("w1 to block inside the 'wait' sub-step", blocked, w1)
    assert await w1.terminate(STOP_DEADLINE) == 0, w1.output()
    assert "Traceback" not in w1.stderr_text(), w1.output()

    stopped = await client.events(handle.execution_id)
    assert [e.name for e in stopped if isinstance(e, ev.SubStepCompleted)] == ["first"]
    for kind in (ev.StepCompleted, ev.StepFailed, ev.AttemptFailed, ev.SubStepFailed):
        assert not names(stopped, kind), f"a graceful stop recorded {kind.__name__}"

    w2 = workers.spawn("w2", lease_seconds=60)
    with anyio.fail_after(DEADLINE + 5):
        output = await handle.result(timeout=DEADLINE)
    final = await client.events(handle.execution_id)
    assert await w2.terminate(STOP_DEADLINE) == 0, w2.output()

    assert output == {"first": 9, "opened": "opened", "second": 16}
    assert_log_is_sound(final)
    assert identity(final[: len(stopped)]) == identity(stopped)
    leases = [e for e in final if isinstance(e, ev.StepLeased)]
    assert len(leases) == 2
    assert {e.attempt for e in leases} == {1}
    assert leases[0].worker_id != leases[1].worker_id
    # the cancelled body ran again (its result was never recorded); the recorded one did not
    assert Counter(ran(effects)) == Counter({"first": 1, "wait": 2, "second": 1})


async def holding_zombie(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine, *, lease_seconds: float
) -> tuple[WorkerProcess, ss.ExecutionHandle[Any]]:
    """Worker A (``WORKER_APP_BLOCK=sync``) running a ``wp.zombie`` whose ``hold`` body blocks
    until ``tmp_path / "gate"`` exists; returned once A is inside that body."""
    effects, gate = tmp_path / "effects.txt", tmp_path / "gate"
    a = workers.spawn("a", lease_seconds=lease_seconds, env={"WORKER_APP_BLOCK": "sync"})
    handle = await client.start("wp.zombie", {"effects": str(effects), "gate": str(gate)})

    async def a_holds() -> bool:
        return f"hold {a.pid}" in ran(effects)

    await eventually("worker A to enter the 'hold' sub-step", a_holds, a)
    return a, handle


async def test_a_stop_waiting_for_a_blocked_body_says_so_and_a_second_sigterm_exits_now(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    effects = tmp_path / "effects.txt"
    # the `hold` body blocks in its thread until the gate exists (never, here): a thread cannot
    # be interrupted, so the first SIGTERM waits for it, saying so; the second exits at once
    a, handle = await holding_zombie(tmp_path, workers, client, lease_seconds=2)
    a.proc.send_signal(signal.SIGTERM)

    async def waiting() -> bool:
        return "still stopping" in a.stderr_text()

    await eventually("worker A to say what its stop waits for", waiting, a)
    assert a.proc.poll() is None, "a stop cannot end a body that has not returned"
    line = next(x for x in a.stderr_text().splitlines() if "still stopping" in x)
    assert handle.execution_id in line
    assert "again to exit now" in line

    a.proc.send_signal(signal.SIGTERM)
    assert await a.exited(STOP_DEADLINE) == 128 + signal.SIGTERM, a.output()
    assert "Traceback" not in a.stderr_text(), a.output()
    assert "exiting now" in a.stderr_text()

    # as after a crash: another worker resumes it once the lease lapses, the body runs again
    b = workers.spawn("b", lease_seconds=2)
    with anyio.fail_after(DEADLINE + 5):
        output = await handle.result(timeout=DEADLINE)
    assert await b.terminate(STOP_DEADLINE) == 0, b.output()
    assert output == {"first": 25, "holder": b.pid, "second": 36}
    assert_log_is_sound(await client.events(handle.execution_id))
    lines = Counter(ran(effects))
    assert lines == Counter({"first": 1, f"hold {a.pid}": 1, f"hold {b.pid}": 1, "second": 1})


# -- 3. A zombie's appends are refused ------------------------------------------------------
async def test_a_worker_frozen_past_its_lease_cannot_append_after_the_takeover(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    effects, gate = tmp_path / "effects.txt", tmp_path / "gate"
    # A's `hold` body blocks until the gate exists and A is frozen (SIGSTOP) past its lease,
    # so A cannot renew it nor notice the takeover: when it thaws, the backend must refuse
    # whatever it tries to append.
    a, handle = await holding_zombie(tmp_path, workers, client, lease_seconds=1)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = workers.spawn("b", lease_seconds=1)
        with anyio.fail_after(DEADLINE + 5):
            output = await handle.result(timeout=DEADLINE)
        before = await client.events(handle.execution_id)
        leases = [e for e in before if isinstance(e, ev.StepLeased)]
        assert len(leases) == 2, leases
        assert {e.attempt for e in leases} == {1}
        assert leases[0].worker_id != leases[1].worker_id
        gate.touch()
    finally:
        os.kill(a.pid, signal.SIGCONT)

    # the body runs in a thread: once thawed, A either appends and is refused, or its renewal
    # finds the lease lost first and stops the actor before it appends
    stopped = (TAKEN_OVER, "lost the lease of execution")

    async def refused() -> bool:
        return any(text in a.stderr_text() for text in stopped)

    await eventually("worker A to be refused", refused, a)
    assert a.proc.poll() is None, "the zombie stops its actor, not its process"
    logged = a.stderr_text().splitlines()
    warning = next(line for line in logged if any(text in line for text in stopped))
    assert handle.execution_id in warning
    after = await client.events(handle.execution_id)
    assert await a.terminate(STOP_DEADLINE) == 0, a.output()
    assert await b.terminate(STOP_DEADLINE) == 0, b.output()

    assert identity(after) == identity(before), "the zombie's refused append left a trace"
    assert_log_is_sound(after)
    assert output == {"first": 25, "holder": b.pid, "second": 36}
    assert await client.state_of(handle.execution_id) == {"holder": b.pid}
    lines = Counter(ran(effects))
    assert lines == Counter({"first": 1, f"hold {a.pid}": 1, f"hold {b.pid}": 1, "second": 1})


# -- 5. a local start whose process dies --------------------------------------------------------
LOCAL_STARTER = """
import sys, uuid, anyio, worker_app
async def main(url, effects):
    engine = worker_app.engine.derive(url=url, workers=1, lease_seconds=1.0)
    execution_id = str(uuid.uuid4())
    print(execution_id, flush=True)  # first: the handler may reach the kill before start returns
    async with engine:
        data = {"effects": effects, "items": [1, 2, 3, 4]}
        handle = await engine.start("wp.durable", data, execution_id=execution_id)
        await handle.result()
anyio.run(main, *sys.argv[1:])
"""


async def test_a_local_start_whose_process_dies_is_resumed_by_another_worker(
    tmp_path: Path, db_url: str, workers: WorkerProcesses, client: ss.Engine
) -> None:
    """A process that starts an execution it runs itself (one commit: scheduled, leased,
    started) and is SIGKILLed mid-handler leaves a lease that expires; a worker elsewhere
    resumes the same attempt and records each sub-step once."""
    effects = tmp_path / "effects.txt"
    env = workers.environment({KILL_AT_ENV: "after-substep-body:2"})
    with anyio.fail_after(DEADLINE):
        starter = await anyio.run_process(
            [sys.executable, "-c", LOCAL_STARTER, db_url, str(effects)],
            cwd=TESTS_DIR,
            env=env,
            check=False,
        )
    assert starter.returncode == -signal.SIGKILL, starter.stderr.decode()
    execution_id = starter.stdout.decode().split()[0]
    at_kill = await client.events(execution_id)
    assert names(at_kill, ev.ExecutionEvent)[:3] == ["StepScheduled", "StepLeased", "StepStarted"]
    assert Counter(ran(effects)) == Counter({"item-0": 1, "item-1": 1})

    w2 = workers.spawn("w2", lease_seconds=1)
    with anyio.fail_after(DEADLINE + 5):
        output = await client.get_handle(execution_id).result(timeout=DEADLINE)
    final = await client.events(execution_id)
    assert await w2.terminate(STOP_DEADLINE) == 0, w2.output()

    assert output == {"total": 30, "squares": [1, 4, 9, 16]}
    assert_log_is_sound(final)
    assert identity(final[: len(at_kill)]) == identity(at_kill)
    leased_by = [e.worker_id for e in final if isinstance(e, ev.StepLeased)]
    assert len(leased_by) == 2
    assert leased_by[0] != leased_by[1]
    # item-1's body had run when the starter died (not recorded): it runs again, once
    assert Counter(ran(effects)) == Counter({"item-0": 1, "item-1": 2, "item-2": 1, "item-3": 1})
