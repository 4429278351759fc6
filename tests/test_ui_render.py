"""The pure parts of the web UI: the scrubber's differences, the list's chart and the flow
graph's layout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from stepsource.engine.ui.render import CHART_KINDS, diff_fields, layout_graph, make_chart
from stepsource.testing.strategies import json_objects


@given(json_objects(), json_objects())
def test_differences_rebuild_both_versions(now: dict[str, Any], before: dict[str, Any]) -> None:
    rows = diff_fields(now, before)
    assert [r.key for r in rows] == sorted(set(now) | set(before))
    shown_now = {r.key: orjson.loads(r.value) for r in rows if r.change != "removed"}
    assert shown_now == now
    shown_before = {
        r.key: orjson.loads(r.before) if r.before is not None else None
        for r in rows
        if r.change != "added"
    }
    assert shown_before == before
    for row in rows:
        if row.change == "same":
            assert row.key in now
            assert now[row.key] == before[row.key]


def test_first_version_marks_nothing_as_changed() -> None:
    assert [r.change for r in diff_fields({"a": 1, "b": 2}, None)] == ["same", "same"]


moments = st.lists(
    st.tuples(
        st.sampled_from(CHART_KINDS),
        st.integers(0, 10_000).map(
            lambda s: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
        ),
    ),
    max_size=60,
)


@given(moments)
def test_chart_counts_every_point_once_and_fits_its_box(points: list[tuple[str, datetime]]) -> None:
    chart = make_chart(points)
    for kind in CHART_KINDS:
        assert sum(b.count for b in chart.bars if b.kind == kind) == sum(
            1 for k, _ in points if k == kind
        )
    for bar in chart.bars:
        assert 0 <= bar.x < chart.width
        assert bar.y >= 0
        assert bar.y + bar.height <= chart.height


@given(
    st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12),
        )
    )
)
def test_graph_nodes_never_overlap_and_edges_point_forward(
    case: tuple[int, list[tuple[int, int]]],
) -> None:
    count, pairs = case
    keys = [f"n{i}" for i in range(count)]
    depends: dict[str, list[str]] = {k: [] for k in keys}
    for a, b in pairs:
        if a < b:  # acyclic: only from lower to higher
            depends[keys[b]].append(keys[a])
    graph = layout_graph([(k, k, "completed", None) for k in keys], depends)
    boxes = [(n.x, n.y) for n in graph.nodes]
    assert len(set(boxes)) == count
    for node in graph.nodes:
        assert node.x + graph.node_width <= graph.width
        assert node.y + graph.node_height <= graph.height
    for edge in graph.edges:
        assert edge.x2 > edge.x1  # a dependency is always in an earlier column


def test_a_long_chain_is_laid_out_without_recursion() -> None:
    """Columns came from a recursive walk, two frames per node: a chain of 400 nodes that
    never started, declared from its end, overflowed the stack (the flow page answered 500)."""
    keys = [f"n{i}" for i in range(2000)]
    depends = {key: [keys[i - 1]] for i, key in enumerate(keys) if i}
    graph = layout_graph([(k, k, "not started", None) for k in reversed(keys)], depends)
    columns = {node.key: node.x for node in graph.nodes}
    assert all(columns[keys[i - 1]] < columns[keys[i]] for i in range(1, len(keys)))
    cyclic = layout_graph([(k, k, "x", None) for k in "abc"], {"a": ["c"], "b": ["a"], "c": ["b"]})
    assert len(cyclic.nodes) == 3  # a cycle in what a log says is drawn, not looped on
