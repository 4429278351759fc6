"""A DAG flow survives a SIGKILLed worker process: the nodes it finished are not run again.

The flow (tests/flow_app.py) is a six-node DAG with a diamond, ``validate -> {reserve,
charge} -> ship -> close`` plus ``validate -> notify -> close``; every node is a child
execution. A client (``workers=0``) in this process starts it; worker 1, a real
``python -m stepsource worker flow_app:engine --workers 4`` process, runs it until the kill
hook (``STEPSOURCE_TEST_KILL_AT``) SIGKILLs it mid-flow; worker 2 finishes it. What the test
looks at is what a user can see: the flow's and the nodes' logs, ``engine.flow_state``, the
result, and a side-effect file to which each node's handler appends its name every time it
runs. Every wait polls an observable condition against a bounded deadline; nothing asserts
wall-clock times.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.testing.processes import KILL_AT_ENV, WorkerProcesses

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import flow_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(120)]

#: generous bound for one process to start, lease, run or stop on a loaded 2-core machine
DEADLINE = 30.0
#: worker 1 dies at the 8th durable commit it reaches, counted over all the executions it runs
#: at once. At most four precede validate's StepCompleted (the flow's ChildStarted,
#: EventAwaited and perhaps StepSuspended, then validate's own), and an uninterrupted run
#: makes about two dozen: the kill is past validate and well before the flow's end. In
#: practice it falls right after charge completes, while reserve, which started first, still
#: polls for charge's marker; the assertions hold wherever the 8th commit falls.
KILL_AT = "after-record:8"
#: how long a diamond sibling waits for the other's marker before it fails (and the flow)
RENDEZVOUS_TIMEOUT = 15.0
ORDER_ID, AMOUNT = "o-42", 10


@pytest.fixture
def anyio_backend() -> str:
    """Process behaviour does not depend on the client's event loop: asyncio only."""
    return "asyncio"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'steps.db'}"  # an absolute path: sqlite:////...


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[WorkerProcesses]:
    """``stepsource worker flow_app:engine`` processes; leftovers killed at teardown."""
    with WorkerProcesses(
        tmp_path,
        db_url,
        "flow_app:engine",
        pythonpath=[TESTS_DIR],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL"),
        workers=4,  # the flow and its independent nodes at once
        lease_seconds=1,  # a dead worker's leases expire quickly
    ) as pool:
        yield pool


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[ss.Engine]:
    """A pure client with flow_app's steps registered (it validates input locally)."""
    engine = flow_app.engine.derive(url=db_url, workers=0)
    try:
        yield engine
    finally:
        await engine.aclose()


# -- helpers -----------------------------------------------------------------------------------
def ran(effects: Path) -> Counter[str]:
    """How many times each node's handler ran: one side-effect line per run."""
    return Counter(effects.read_text().splitlines() if effects.exists() else [])


def count(events: Sequence[Any], kind: type[Any]) -> int:
    return sum(1 for e in events if isinstance(e, kind))


def identity(events: Sequence[Any]) -> list[tuple[str, int, Any]]:
    """What pins each event: its type, version and own timestamp."""
    return [(type(e).__name__, e.originator_version, e.timestamp) for e in events]


def nodes_started(flow_events: Sequence[Any]) -> dict[str, str]:
    """Node name -> its child execution id, from the flow's ChildStarted records."""
    started = [e for e in flow_events if isinstance(e, ev.ChildStarted)]
    nodes = {str(e.node): e.child_execution_id for e in started}
    assert len(nodes) == len(started), f"a node was started twice: {started}"
    return nodes


async def completed_nodes(engine: ss.Engine, flow_events: Sequence[Any]) -> set[str]:
    """The nodes whose child execution's log ends with StepCompleted."""
    done: set[str] = set()
    for node, child_id in nodes_started(flow_events).items():
        events = await engine.events(child_id)
        if events and isinstance(events[-1], ev.StepCompleted):
            done.add(node)
    return done


# -- the test ----------------------------------------------------------------------------------
async def test_a_dag_flow_killed_mid_flow_is_finished_by_another_worker_exactly_once(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    effects, markers = tmp_path / "effects.txt", tmp_path / "markers"
    markers.mkdir()
    data = {
        "effects": str(effects),
        "markers": str(markers),
        "order_id": ORDER_ID,
        "amount": AMOUNT,
        "rendezvous_timeout": RENDEZVOUS_TIMEOUT,
    }
    expected = flow_app.expected_output(ORDER_ID, AMOUNT)
    handle = await client.start(flow_app.FLOW, data)
    flow_id = handle.execution_id

    # worker 1 runs the flow until the kill hook SIGKILLs it mid-flow
    w1 = workers.spawn("w1", kill_at=KILL_AT)
    assert await w1.exited() == -signal.SIGKILL, w1.output()
    at_kill = await client.events(flow_id)
    ran_at_kill = ran(effects)
    done_at_kill = await completed_nodes(client, at_kill)
    assert not count(at_kill, ev.StepCompleted), "worker 1 died before the flow completed"
    assert "validate" in done_at_kill, (done_at_kill, identity(at_kill))
    assert done_at_kill < set(flow_app.NODES), done_at_kill
    state_at_kill = await client.flow_state(flow_id)
    assert state_at_kill.status != "completed"
    assert {
        node for node, s in state_at_kill.node_states.items() if s["status"] == "completed"
    } == done_at_kill
    for node in done_at_kill:
        assert ran_at_kill[node] == 1, (node, ran_at_kill)

    # worker 2 (leases of 1 s: worker 1's expire at once) finishes the flow
    w2 = workers.spawn("w2")
    with anyio.fail_after(DEADLINE + 5):
        output = await handle.result(timeout=DEADLINE)
    final = await client.events(flow_id)
    children = nodes_started(final)
    child_logs = {node: await client.events(child_id) for node, child_id in children.items()}
    state = await client.flow_state(flow_id)
    assert await w2.terminate() == 0, w2.output()

    # the flow completed exactly once, with every node's result, continuing worker 1's log
    assert output == expected
    assert [e.originator_version for e in final] == list(range(1, len(final) + 1))
    assert identity(final[: len(at_kill)]) == identity(at_kill)
    assert count(final, ev.StepCompleted) == 1
    assert isinstance(final[-1], ev.StepCompleted), "events were appended after StepCompleted"
    assert not count(final, ev.StepFailed)
    assert not count(final, ev.AttemptFailed), "a crash must not fail the flow's attempt"
    assert count(final, ev.StepStarted) == 1, "a resume continues the same attempt"
    flow_runs = await client.executions(step_id=flow_app.FLOW)
    assert [run.execution_id for run in flow_runs] == [flow_id]

    # each node: one child execution, completed exactly once
    assert sorted(children) == sorted(flow_app.NODES)
    nodes_at_kill = nodes_started(at_kill)
    assert {n: children[n] for n in nodes_at_kill} == nodes_at_kill, "a node was restarted"
    for node, events in child_logs.items():
        assert count(events, ev.StepCompleted) == 1, (node, identity(events))
        assert isinstance(events[-1], ev.StepCompleted), (node, identity(events))
        assert not count(events, ev.StepFailed), (node, identity(events))
        assert not count(events, ev.AttemptFailed), (node, identity(events))
        assert events[-1].output == expected[node]
    everything = await client.executions(flow_id=flow_app.FLOW, limit=50)
    assert len(everything) == 1 + len(flow_app.NODES)
    assert {run.status for run in everything} == {"completed"}

    # a node completed before the kill did not run again; one killed mid-run ran once more
    ran_final = ran(effects)
    assert set(ran_final) == set(flow_app.NODES), ran_final
    for node in flow_app.NODES:
        again = 0 if node in done_at_kill else 1
        assert ran_final[node] == ran_at_kill[node] + again, (node, ran_at_kill, ran_final)
        assert ran_final[node] <= 2, (node, ran_final)

    # the flow's state, projected from its log and its nodes' logs
    assert state.status == "completed"
    assert state.output == expected
    assert state.current_node_id is None
    assert sorted(state.node_states) == sorted(flow_app.NODES)
    for node, node_state in state.node_states.items():
        assert node_state["status"] == "completed", (node, node_state)
        assert node_state["execution_id"] == children[node]
        assert node_state["output"] == expected[node]

    # the diamond's siblings met: each left its marker and found the other's (a sibling run
    # alone would have failed after RENDEZVOUS_TIMEOUT, and with it the flow)
    assert sorted(p.name for p in markers.iterdir()) == ["charge", "reserve"]
