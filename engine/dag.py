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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stepsource.aggregates.values import JSON, JSONObject, to_json_object, with_article
from stepsource.engine.children import ChildHandle, start_child, unwrap, wait_children
from stepsource.engine.recorder import Recorder
from stepsource.errors import UsageError

__all__ = ["Node", "declared", "run_dag", "validate_dag"]


@dataclass(frozen=True)
class Node:
    """One node of a DAG: the step it runs and the nodes it waits for."""

    step_id: str
    depends_on: Iterable[str] = ()
    optional: bool = False
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # kept as a tuple: a generator given here was used up by the checks, and the node
        # then ran without waiting for its dependencies; None is "no dependencies"
        given: object = self.depends_on
        if given is None:
            object.__setattr__(self, "depends_on", ())
        elif isinstance(given, Iterable) and not isinstance(given, str | bytes | Mapping):
            object.__setattr__(self, "depends_on", tuple(given))


def validate_dag(flow_id: str, nodes: Mapping[str, Node]) -> list[str]:
    """The nodes in a dependency-respecting order, or UsageError for a bad graph."""
    if not isinstance(nodes, Mapping) or not nodes:
        raise UsageError(
            "a DAG needs at least one node, given as a dict {name: ss.Node(step_id)}",
            step_id=flow_id,
        )
    for name, node in nodes.items():
        _check_node(flow_id, name, node, nodes)
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


def _check_node(flow_id: str, name: object, node: object, nodes: Mapping[str, Node]) -> None:
    """One node's mistakes, refused when the DAG is defined rather than when it runs."""
    if not isinstance(name, str) or not name:
        raise UsageError(
            f"a node's name must be a non-empty str, not {name!r}",
            step_id=flow_id,
            hint="Name each node after what it does, e.g. 'charge'",
        )
    if not isinstance(node, Node):
        raise UsageError(
            f"node {name!r} is {with_article(type(node).__name__)}, not an ss.Node",
            step_id=flow_id,
            hint=f"Write {name!r}: ss.Node('step.id', depends_on=[...])",
        )
    if not isinstance(node.step_id, str) or not node.step_id:
        given = getattr(node.step_id, "__qualname__", None)
        runs = repr(node.step_id) if given is None else f"the function {given}"
        raise UsageError(
            f"node {name!r} runs {runs}: a Node takes the id of the step it runs",
            step_id=flow_id,
            hint="Pass the id given to @engine.step, e.g. ss.Node('payment.charge')",
        )
    depends_on: object = node.depends_on
    if not isinstance(depends_on, tuple) or not all(isinstance(d, str) for d in depends_on):
        raise UsageError(
            f"node {name!r}: depends_on must be a list of node names, not {depends_on!r}",
            step_id=flow_id,
            hint="Write depends_on=['validate'], even for one dependency",
        )
    unknown = [d for d in node.depends_on if d not in nodes]
    if unknown:
        raise UsageError(
            f"node {name!r} depends on unknown node(s) {unknown}",
            step_id=flow_id,
            hint=f"Known nodes: {', '.join(nodes)}",
        )
    if not isinstance(node.optional, bool):
        raise UsageError(
            f"node {name!r}: optional must be True or False, not {node.optional!r}",
            step_id=flow_id,
        )
    # the config is recorded with each run of the node: it must be a JSON object now
    to_json_object(node.config, what=f"nodes[{name!r}].config", step_id=flow_id)


def declared(nodes: Mapping[str, Node]) -> JSONObject:
    """The DAG as its flow's definition records it: each node's step, dependencies and
    whether it is optional (what the UI draws, started or not)."""
    return {
        name: {"step": n.step_id, "depends_on": list(n.depends_on), "optional": n.optional}
        for name, n in nodes.items()
    }


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
