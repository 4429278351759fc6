"""Flows: child steps, parallel children, DAG templates, sagas, cancellation."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss

pytestmark = pytest.mark.anyio


async def test_run_step_memoizes_a_child_whose_record_points_back(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    runs: list[int] = []

    @engine.step("child.double")
    async def double(ctx: ss.StepContext, n: int) -> int:
        runs.append(n)
        return n * 2

    @engine.step("parent.sum")
    async def parent(ctx: ss.StepContext, n: int) -> dict[str, Any]:
        first = await ctx.run_step("child.double", {"n": n})
        second = await ctx.run_step("child.double", {"n": first})
        return {"result": second, "task": ctx.task_uuid}

    async with engine:
        handle = await engine.start("parent.sum", {"n": 5})
        result = await handle.result(timeout=20)
    assert result == {"result": 20, "task": handle.execution_id}
    assert sorted(runs) == [5, 10]  # each child ran once although the parent woke up twice
    children = await engine.executions(step_id="child.double")
    assert len(children) == 2
    for child in children:
        record = await engine.describe(child.execution_id)
        assert record.parent_execution_id == handle.execution_id
        assert record.parent_id == "parent.sum"
        assert record.status == "completed"


async def test_children_started_together_run_in_parallel(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=4)
    arrived: list[str] = []
    both = anyio.Event()

    @engine.step("child.meet")
    async def meet(ctx: ss.StepContext, name: str) -> str:
        arrived.append(name)
        if len(arrived) == 2:
            both.set()
        with anyio.fail_after(10):
            await both.wait()  # only passes if the other child runs at the same time
        return name.upper()

    @engine.step("parent.fanout")
    async def fanout(ctx: ss.StepContext) -> list[Any]:
        left = await ctx.start_step("child.meet", {"name": "left"})
        right = await ctx.start_step("child.meet", {"name": "right"})
        return [await left.result(), await right.result()]

    async with engine:
        handle = await engine.start("parent.fanout")
        assert await handle.result(timeout=20) == ["LEFT", "RIGHT"]


def diamond_engine(url: str, effects: list[str], rendezvous: anyio.Event) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01, workers=4)
    met: list[str] = []

    class Rendezvous:
        async def meet(self, name: str) -> None:
            met.append(name)
            if len(met) >= 2:
                rendezvous.set()
            with anyio.fail_after(10):
                await rendezvous.wait()

    engine.register_service("rendezvous", Rendezvous())

    @engine.step("order.validate")
    async def validate(ctx: ss.StepContext, order_id: str) -> dict[str, Any]:
        effects.append("validate")
        return {"order_id": order_id, "valid": True}

    @engine.step("stock.reserve")
    async def reserve(ctx: ss.StepContext, order_id: str) -> dict[str, Any]:
        effects.append("reserve")
        await ctx.get_service("rendezvous").meet("reserve")
        return {"reserved": ctx.get_dependency_field("validate", "order_id")}

    @engine.step("payment.charge")
    async def charge(ctx: ss.StepContext, amount: int) -> dict[str, Any]:
        effects.append("charge")
        await ctx.get_service("rendezvous").meet("charge")
        return {"charged": amount * ctx.get_config("multiplier")}  # type: ignore[operator]

    @engine.step("shipping.schedule")
    async def ship(ctx: ss.StepContext) -> dict[str, Any]:
        effects.append("ship")
        return {
            "stock": ctx.get_dependency_result("reserve"),
            "paid": ctx.get_dependency_field("charge", "charged"),
        }

    @engine.step("promo.email", optional=True)
    async def promo(ctx: ss.StepContext) -> None:
        effects.append("promo")
        raise ConnectionError("mail server down")

    @engine.step("order.close")
    async def close(ctx: ss.StepContext) -> dict[str, Any]:
        effects.append("close")
        return {"promo": ctx.get_dependency_result("promo"), "shipped": True}

    engine.dag(
        "order.flow",
        {
            "validate": ss.Node("order.validate"),
            "reserve": ss.Node("stock.reserve", depends_on=["validate"]),
            "charge": ss.Node("payment.charge", depends_on=["validate"], config={"multiplier": 3}),
            "ship": ss.Node("shipping.schedule", depends_on=["reserve", "charge"]),
            "promo": ss.Node("promo.email", depends_on=["validate"], optional=True),
            "close": ss.Node("order.close", depends_on=["ship", "promo"]),
        },
    )
    return engine


async def test_a_diamond_dag_runs_independent_nodes_concurrently(backend_url: str) -> None:
    effects: list[str] = []
    engine = diamond_engine(backend_url, effects, anyio.Event())
    async with engine:
        handle = await engine.start("order.flow", {"order_id": "o-7", "amount": 10})
        output = await handle.result(timeout=30)
    assert output == {
        "validate": {"order_id": "o-7", "valid": True},
        "reserve": {"reserved": "o-7"},
        "charge": {"charged": 30},
        "ship": {"stock": {"reserved": "o-7"}, "paid": 30},
        "close": {"promo": None, "shipped": True},
    }  # the optional node failed: absent, and None to its dependants
    assert sorted(effects) == sorted(["validate", "reserve", "charge", "ship", "promo", "close"])
    assert effects.index("ship") > max(effects.index("reserve"), effects.index("charge"))
    nodes = await engine.executions(flow_id="order.flow", limit=20)
    assert len(nodes) == 7  # the flow and its six nodes share the flow id


async def test_dag_definitions_are_checked_when_defined() -> None:
    engine = ss.Engine("memory://")
    with pytest.raises(ss.UsageError, match="cycle: a -> b -> a"):
        engine.dag(
            "bad", {"a": ss.Node("x", depends_on=["b"]), "b": ss.Node("y", depends_on=["a"])}
        )
    with pytest.raises(ss.UsageError, match="unknown node"):
        engine.dag("bad2", {"a": ss.Node("x", depends_on=["nope"])})


async def charge(ctx: ss.StepContext) -> None:
    return None


@pytest.mark.parametrize(
    ("nodes", "error", "text"),
    [
        # one dependency given as a str: it was read as the nodes 'v', 'a', 'l'...
        (
            {"validate": ss.Node("x"), "ship": ss.Node("y", depends_on="validate")},
            ss.UsageError,
            "node 'ship': depends_on must be a list of node names, not 'validate'",
        ),
        # a number: a bare TypeError ('int' object is not iterable)
        (
            {"validate": ss.Node("x"), "ship": ss.Node("y", depends_on=3)},  # type: ignore[arg-type]
            ss.UsageError,
            "node 'ship': depends_on must be a list of node names, not 3",
        ),
        # a config that could not be recorded failed every run of the flow, not the call
        (
            {"charge": ss.Node("x", config={"when": datetime.date(2026, 1, 1)})},
            ss.StateValueError,
            "nodes['charge'].config['when'] is a date, which is not strict JSON",
        ),
        # a name that failed the flow's output ({1: ...}) or made a confusing one ({"": ...})
        ({1: ss.Node("x")}, ss.UsageError, "a node's name must be a non-empty str, not 1"),
        ({"": ss.Node("x")}, ss.UsageError, "a node's name must be a non-empty str, not ''"),
        # the handler instead of its id failed the flow at its first node
        (
            {"charge": ss.Node(charge)},  # type: ignore[arg-type]
            ss.UsageError,
            "node 'charge' runs the function charge: a Node takes the id of the step it runs",
        ),
        ({"charge": "x"}, ss.UsageError, "node 'charge' is a str, not an ss.Node"),
        (
            {},
            ss.UsageError,
            "a DAG needs at least one node, given as a dict {name: ss.Node(step_id)}",
        ),
    ],
)
async def test_a_dag_node_that_could_not_run_is_refused_when_defined(
    nodes: dict[Any, Any], error: type[Exception], text: str
) -> None:
    engine = ss.Engine("memory://")
    with pytest.raises(error) as refused:
        engine.dag("order.flow", nodes)
    assert str(refused.value).startswith(f"{text} (step 'order.flow')")
    assert "order.flow" not in engine.step_ids()


async def test_a_child_input_that_is_not_a_dict_is_refused_in_the_parent() -> None:
    """``ctx.run_step("child", [1])`` failed with dict()'s TypeError ("cannot convert
    dictionary update sequence element"); nothing is started or recorded for it."""
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("child.any")
    async def child(ctx: ss.StepContext) -> int:
        return 1

    @engine.step("parent.list")
    async def parent(ctx: ss.StepContext) -> str:
        try:
            await ctx.run_step("child.any", [1])  # type: ignore[arg-type]
        except ss.StateValueError as error:
            return error.reason
        return "started"

    async with engine:
        handle = await engine.start("parent.list")
        assert await handle.result(timeout=10) == (
            "start_step('child.any') needs its input as a dict, not a list"
        )
        assert [e.step_id for e in await engine.executions()] == ["parent.list"]


async def test_a_dag_defined_while_the_engine_serves_is_refused(tmp_path: Path) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'dag.db'}", poll_interval=0.01)
    async with engine:
        with pytest.raises(ss.UsageError, match="a DAG registered while the engine runs"):
            engine.dag("order.flow", {"charge": ss.Node("x")})
    assert "order.flow" not in engine.step_ids()


async def test_a_required_child_failure_fails_the_parent_an_optional_one_does_not(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("child.broken")
    async def broken(ctx: ss.StepContext) -> None:
        raise ValueError("broken child")

    @engine.step("parent.careful")
    async def careful(ctx: ss.StepContext) -> list[Any]:
        maybe = await ctx.run_step("child.broken", optional=True)
        try:
            await ctx.run_step("child.broken")
        except ss.ChildFailedError as error:
            return [maybe, "caught", "broken child" in str(error)]
        return [maybe]

    async with engine:
        handle = await engine.start("parent.careful")
        assert await handle.result(timeout=20) == [None, "caught", True]


async def test_cancelling_a_parent_cancels_its_running_children(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)

    @engine.step("child.forever")
    async def forever(ctx: ss.StepContext) -> None:
        await ctx.wait_for_event("never")

    @engine.step("parent.waits")
    async def waits(ctx: ss.StepContext) -> Any:
        return await ctx.run_step("child.forever")

    async with engine:
        handle = await engine.start("parent.waits")
        with anyio.fail_after(10):
            while len(await engine.executions(status="waiting")) < 2:
                await anyio.sleep(0.01)
        await handle.cancel("customer gave up")
        with pytest.raises(ss.StepCancelledError):
            await handle.result(timeout=10)
        [child] = await engine.executions(step_id="child.forever")
        with pytest.raises(ss.StepCancelledError, match="parent"):
            await engine.get_handle(child.execution_id).result(timeout=10)


async def test_a_dag_failing_on_a_required_node_cancels_the_nodes_still_running(
    backend_url: str,
) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01, workers=4)
    effects: list[str] = []

    @engine.step("node.broken")
    async def broken(ctx: ss.StepContext) -> None:
        await ctx.fail("no stock")

    @engine.step("node.slow")
    async def slow(ctx: ss.StepContext) -> str:
        await ctx.wait_for_event("go")  # a durable wait: the cancel is delivered here
        await ctx.do("charge", lambda: effects.append("charged"))
        return "charged"

    engine.dag("order.flow", {"reserve": ss.Node("node.broken"), "charge": ss.Node("node.slow")})
    async with engine:
        handle = await engine.start("order.flow")
        with pytest.raises(ss.StepFailedError):
            await handle.result(timeout=20)
        [node] = await engine.executions(step_id="node.slow")
        # it waited on after the flow had failed, to charge once its event came
        with pytest.raises(ss.StepCancelledError, match=r"parent \S+ failed"):
            await engine.get_handle(node.execution_id).result(timeout=20)
    assert effects == []


async def test_dependencies_given_as_a_generator_or_none_are_kept() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)
    order: list[str] = []

    @engine.step("node.first")
    async def first(ctx: ss.StepContext) -> str:
        await ctx.sleep(0.05)
        order.append("first")
        return "first-result"

    @engine.step("node.second")
    async def second(ctx: ss.StepContext) -> Any:
        order.append("second")
        return ctx.get_dependency_result("a")

    names = ["a"]
    # the generator was used up by the definition checks: "b" started at once and read None
    engine.dag(
        "gen.flow",
        {
            "a": ss.Node("node.first", depends_on=None),  # type: ignore[arg-type]
            "b": ss.Node("node.second", depends_on=(n for n in names)),
        },
    )
    async with engine:
        output = await (await engine.start("gen.flow")).result(timeout=20)
    assert output == {"a": "first-result", "b": "first-result"}
    assert order == ["first", "second"]


async def test_a_saga_compensates_in_reverse_order(backend_url: str) -> None:
    engine = ss.Engine(backend_url, poll_interval=0.01)
    log: list[str] = []

    def act(name: str, fail: bool = False) -> Any:
        def run() -> str:
            log.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")
            return f"{name}-id"

        return run

    def undo(name: str) -> Any:
        return lambda result: log.append(f"undo {name} {result}")

    @engine.step("saga.order")
    async def order(ctx: ss.StepContext) -> list[str]:
        try:
            async with ctx.saga("order") as saga:
                await saga.step("reserve", act("reserve"), compensate=undo("reserve"))
                await saga.step("charge", act("charge"), compensate=undo("charge"))
                await saga.step("ship", act("ship", fail=True))
        except ss.SubStepFailedError:
            return saga.compensated
        return []

    async with engine:
        handle = await engine.start("saga.order")
        assert await handle.result(timeout=20) == ["charge", "reserve"]
    assert log == ["reserve", "charge", "ship", "undo charge charge-id", "undo reserve reserve-id"]
    types = [e.type for e in await engine.history_of(handle.execution_id)]
    assert "saga-compensating" in types


async def test_flow_state_projects_seed003_workflow_state(backend_url: str) -> None:
    effects: list[str] = []
    engine = diamond_engine(backend_url, effects, anyio.Event())
    async with engine:
        handle = await engine.start("order.flow", {"order_id": "o-9", "amount": 2})
        await handle.result(timeout=30)
    state = await engine.flow_state(handle.execution_id)
    assert isinstance(state, ss.WorkflowState)
    assert (state.flow_id, state.execution_id, state.status) == (
        "order.flow",
        handle.execution_id,
        "completed",
    )
    assert state.input == {"order_id": "o-9", "amount": 2}
    assert isinstance(state.output, dict)
    assert set(state.output) == {"validate", "reserve", "charge", "ship", "close"}
    assert set(state.node_states) == {"validate", "reserve", "charge", "ship", "promo", "close"}
    assert state.node_states["promo"]["status"] == "failed"
    assert state.node_states["promo"]["error"] is not None
    assert state.node_states["charge"]["output"] == {"charged": 6}
    assert state.current_node_id is None
    assert state.created_at.tzinfo is not None
    assert state.completed_at is not None


async def test_a_parents_wait_for_its_child_leaves_no_wake_up_item_behind(tmp_path: Path) -> None:
    """A child posts an item to its parent's inbox as it ends, to wake it. A child that ended
    after the parent read its inbox, and before it looked at the child, left that item there
    for good once the parent moved on (a dozen rows per thousand parents with a worker in
    another process); the wait's end takes it now."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    worker = ss.Engine(url, poll_interval=0.01, workers=16)
    client = ss.Engine(url, workers=0)

    @worker.step("nudge.child")
    async def child(ctx: ss.StepContext, n: int) -> int:
        await ctx.set_state("c", n)
        return n + 1

    @worker.step("nudge.parent")
    async def parent(ctx: ss.StepContext, n: int) -> int:
        return int(await ctx.run_step("nudge.child", {"n": n}))

    async with worker, client:
        handles = []
        for n in range(300):
            handles.append(await client.start("nudge.parent", {"n": n}))
            await anyio.sleep(0.002)
        for n, handle in enumerate(handles):
            assert await handle.result(timeout=60) == n + 1
        backend = worker.store.backend
        left = [
            item
            for handle in handles
            for item in await backend.inbox(handle.execution_id)
            if item.kind == "child"
        ]
    assert left == []
