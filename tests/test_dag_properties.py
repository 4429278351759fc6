"""Property: for random DAGs, every node runs exactly once and after all of its dependencies."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stepsource as ss


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    """A DAG as {node: dependencies}; edges only go from earlier to later nodes."""
    count = draw(st.integers(1, 7))
    names = [f"n{i}" for i in range(count)]
    graph: dict[str, list[str]] = {}
    for index, name in enumerate(names):
        graph[name] = draw(st.lists(st.sampled_from(names[:index]), unique=True)) if index else []
    return graph


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=dags(), optional_failures=st.sets(st.sampled_from([f"n{i}" for i in range(7)])))
def test_dag_order_respects_dependencies_and_each_node_runs_once(
    graph: dict[str, list[str]], optional_failures: set[str]
) -> None:
    timeline: list[tuple[str, str]] = []
    engine = ss.Engine("memory://", poll_interval=0.005, workers=4)

    @engine.step("dag.node")
    async def node(ctx: ss.StepContext) -> str:
        name = str(ctx.get_config("name"))
        timeline.append(("start", name))
        await anyio.lowlevel.checkpoint()
        timeline.append(("end", name))
        if name in optional_failures:
            raise RuntimeError(f"{name} fails (optional)")
        return name

    engine.dag(
        "random.flow",
        {
            name: ss.Node(
                "dag.node",
                depends_on=deps,
                optional=name in optional_failures,
                config={"name": name},
            )
            for name, deps in graph.items()
        },
    )

    async def main() -> Any:
        async with engine:
            handle = await engine.start("random.flow")
            return await handle.result(timeout=30)

    output = anyio.run(main)
    starts = [name for kind, name in timeline if kind == "start"]
    assert sorted(starts) == sorted(graph)  # each node exactly once
    for name, deps in graph.items():
        for dep in deps:
            assert timeline.index(("end", dep)) < timeline.index(("start", name))
    assert output == {n: n for n in graph if n not in optional_failures}
