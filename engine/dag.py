"""DAG templates: nodes run as child executions, in parallel where independent.

``engine.dag(flow_id, {name: Node(step_id, depends_on=[...], optional=False, config={...})})``
registers a step ``flow_id`` whose handler starts every node whose dependencies are done,
waits for whichever child ends first, and repeats. Every node receives the flow's input (its
handler's parameters filled by name, other keys ignored), the node's ``config`` as its step
config, and its upstream results as ``{"result": value}`` envelopes that
``ctx.get_dependency_result`` unwraps. An optional node that fails is absent from the output
and from its dependants' dependencies; any other failure fails the flow. The flow's output is
``{node: result}`` for every node that completed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stepsource.aggregates.values import JSON, JSONObject
from stepsource.engine.children import ChildHandle, start_child, unwrap, wait_children
from stepsource.engine.recorder import Recorder
from stepsource.errors import UsageError

__all__ = ["Node", "run_dag", "validate_dag"]


@dataclass(frozen=True)
class Node:
    """One node of a DAG: the step it runs and the nodes it waits for."""

    step_id: str
    depends_on: Sequence[str] = ()
    optional: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)


def validate_dag(flow_id: str, nodes: Mapping[str, Node]) -> list[str]:
    """The nodes in a dependency-respecting order, or UsageError for a bad graph."""
    if not nodes:
        raise UsageError("a DAG needs at least one node", step_id=flow_id)
    for name, node in nodes.items():
        if not isinstance(node, Node):
            raise UsageError(f"node {name!r} is not an ss.Node", step_id=flow_id)
        unknown = [d for d in node.depends_on if d not in nodes]
        if unknown:
            raise UsageError(
                f"node {name!r} depends on unknown node(s) {unknown}",
                step_id=flow_id,
                hint=f"Known nodes: {', '.join(nodes)}",
            )
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = [*path[path.index(name) :], name]
            raise UsageError(
                f"the DAG has a cycle: {' -> '.join(cycle)}",
                step_id=flow_id,
                hint="Remove one of the dependencies in the cycle",
            )
        state[name] = "visiting"
        for dependency in nodes[name].depends_on:
            visit(dependency, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in nodes:
        visit(name, [])
    return order


async def run_dag(recorder: Recorder, nodes: Mapping[str, Node], order: list[str]) -> JSONObject:
    """The DAG handler: start ready nodes, wait for any to end, until all are done."""
    results: dict[str, JSON] = {}
    settled: set[str] = set()  # completed, or failed while optional
    running: dict[str, ChildHandle] = {}
    while True:
        for name in order:
            node = nodes[name]
            if name in settled or name in running:
                continue
            if not all(d in settled for d in node.depends_on):
                continue
            dependencies: JSONObject = {
                d: {"result": results[d]} for d in node.depends_on if d in results
            }
            running[name] = await start_child(
                recorder,
                node.step_id,
                recorder.aggregate.input,
                node=name,
                optional=node.optional,
                config=node.config,
                dependencies=dependencies,
            )
        if not running:
            return dict(results)
        ids = [child.execution_id for child in running.values()]
        outcome = await wait_children(recorder, ids)
        name = next(n for n, c in running.items() if c.execution_id == outcome["execution_id"])
        child = running.pop(name)
        value = unwrap(recorder, outcome, optional=child.optional)  # a failed required node raises
        if outcome.get("status") == "completed":
            results[name] = value
        settled.add(name)
