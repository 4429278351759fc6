"""Pure helpers of the web UI: JSON text, differences between two versions, and the geometry
of the server-rendered SVG pictures (the templates draw them; every text goes through Jinja's
autoescape there)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from stepsource.aggregates import events as ev

__all__ = [
    "Bar",
    "Chart",
    "FieldChange",
    "Graph",
    "as_json",
    "as_plain",
    "diff_fields",
    "event_fields",
    "layout_graph",
    "make_chart",
    "make_picture",
    "ms_time",
    "when",
]


def as_plain(value: Any) -> Any:
    """A value made of JSON types only (dataclasses and datetimes turned into data)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value


def as_json(value: Any, *, indent: bool = True) -> str:
    option = orjson.OPT_SORT_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(as_plain(value), option=option, default=str).decode()


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def ms_time(ms: int | None) -> str:
    if ms is None:
        return "—"
    return when(datetime.fromtimestamp(ms / 1000, tz=UTC))


def event_fields(event: ev.ExecutionEvent) -> dict[str, Any]:
    """An event as plain data: its type, version, time and every field it carries."""
    data: dict[str, Any] = {
        "type": type(event).__name__,
        "version": event.originator_version,
        "timestamp": event.timestamp.isoformat(),
    }
    for key, value in vars(event).items():
        if key not in ("originator_id", "originator_version", "timestamp"):
            data[key] = as_plain(value)
    return data


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One key of an object at version N beside its value at N-1."""

    key: str
    value: str
    before: str | None
    change: str  # "same", "added", "changed" or "removed"


def diff_fields(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> list[FieldChange]:
    """The keys of ``now`` (and those ``before`` had and ``now`` lost), each marked."""
    rows: list[FieldChange] = []
    old = before or {}
    for key in sorted(set(now) | set(old)):
        text = as_json(now[key]) if key in now else ""
        prior = as_json(old[key]) if key in old else None
        if key not in now:
            change = "removed"
        elif before is None or key not in old:
            change = "added" if before is not None else "same"
        elif prior != text:
            change = "changed"
        else:
            change = "same"
        rows.append(FieldChange(str(key), text, prior, change))
    return rows


# -- the chart of the executions list ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    height: float
    kind: str
    count: int
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bars: tuple[Bar, ...]
    maximum: int
    start: str
    end: str


CHART_KINDS = ("started", "completed", "failed")


def make_chart(
    moments: Iterable[tuple[str, datetime]],
    *,
    buckets: int = 24,
    width: int = 480,
    height: int = 90,
) -> Chart:
    """Starts, completions and failures over time as grouped bars (``(kind, moment)`` pairs)."""
    points = [(kind, moment) for kind, moment in moments if kind in CHART_KINDS]
    if not points:
        return Chart(width, height, (), 0, "", "")
    first = min(m for _, m in points)
    last = max(m for _, m in points)
    span = max((last - first).total_seconds(), 1e-3)
    counts = [dict.fromkeys(CHART_KINDS, 0) for _ in range(buckets)]
    for kind, moment in points:
        index = min(int((moment - first).total_seconds() / span * buckets), buckets - 1)
        counts[index][kind] += 1
    return chart_of(first, last, counts, width=width, height=height)


def chart_of(
    first: datetime | None,
    last: datetime | None,
    counts: Sequence[Mapping[str, int]],
    *,
    width: int = 480,
    height: int = 90,
) -> Chart:
    """The bars of counts already made per bucket (``{kind: count}`` from ``first`` to
    ``last``), as ``Engine.execution_stats`` gives them."""
    if first is None or last is None or not any(any(c.values()) for c in counts):
        return Chart(width, height, (), 0, "", "")
    maximum = max(max(c.get(kind, 0) for kind in CHART_KINDS) for c in counts)
    slot = width / len(counts)
    bar_width = slot / (len(CHART_KINDS) + 1)
    bars: list[Bar] = []
    for index, bucket in enumerate(counts):
        for offset, kind in enumerate(CHART_KINDS):
            count = bucket.get(kind, 0)
            if not count:
                continue
            bar_height = max(2.0, (height - 14) * count / maximum)
            bars.append(
                Bar(
                    x=round(index * slot + offset * bar_width, 1),
                    y=round(height - 12 - bar_height, 1),
                    height=round(bar_height, 1),
                    kind=kind,
                    count=count,
                    label=f"{count} {kind}",
                )
            )
    return Chart(width, height, tuple(bars), maximum, when(first), when(last))


# -- the graph of a flow ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GraphNode:
    key: str
    label: str
    status: str
    execution_id: str | None
    x: float
    y: float


@dataclass(frozen=True, slots=True)
class Edge:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, slots=True)
class Graph:
    width: int
    height: int
    nodes: tuple[GraphNode, ...]
    edges: tuple[Edge, ...]
    node_width: int
    node_height: int


def layout_graph(
    nodes: Sequence[tuple[str, str, str, str | None]],
    depends: Mapping[str, Sequence[str]],
    *,
    node_width: int = 170,
    node_height: int = 46,
) -> Graph:
    """Columns by longest path from the roots: ``nodes`` are (key, label, status, execution
    id); ``depends`` maps a key to the keys it waits for (unknown keys are ignored)."""
    keys = [n[0] for n in nodes]
    known = set(keys)

    def parents(key: str) -> list[str]:
        return [d for d in depends.get(key, ()) if d in known]

    # longest path from the roots, walked without recursion (a chain of a few hundred nodes
    # overflowed the stack); an edge back onto the path being walked is left out
    depth: dict[str, int] = {}
    for start in keys:
        if start in depth:
            continue
        stack = [(start, iter(parents(start)))]
        on_path = {start}
        while stack:
            key, pending = stack[-1]
            for parent in pending:
                if parent not in depth and parent not in on_path:
                    on_path.add(parent)
                    stack.append((parent, iter(parents(parent))))
                    break
            else:
                stack.pop()
                on_path.discard(key)
                depth[key] = 1 + max((depth[p] for p in parents(key) if p in depth), default=-1)
    columns: dict[int, list[str]] = {}
    for key in keys:
        columns.setdefault(depth[key], []).append(key)
    gap_x, gap_y, pad = 60, 22, 16
    where: dict[str, tuple[float, float]] = {}
    for column, members in columns.items():
        for row, key in enumerate(members):
            where[key] = (pad + column * (node_width + gap_x), pad + row * (node_height + gap_y))
    placed = tuple(
        GraphNode(key, label, status, eid, *where[key]) for key, label, status, eid in nodes
    )
    edges = tuple(
        Edge(
            where[d][0] + node_width,
            where[d][1] + node_height / 2,
            where[key][0],
            where[key][1] + node_height / 2,
        )
        for key in keys
        for d in depends.get(key, ())
        if d in where
    )
    width = int(pad * 2 + (max(columns, default=0) + 1) * (node_width + gap_x) - gap_x)
    height = int(
        pad * 2 + max((len(m) for m in columns.values()), default=1) * (node_height + gap_y) - gap_y
    )
    return Graph(width, height, placed, edges, node_width, node_height)


# -- the picture of an execution's attempts, sub-steps and waits over time ------------------------
@dataclass(frozen=True, slots=True)
class Span:
    x: float
    width: float
    y: float
    kind: str  # "attempt", "wait" or "substep"
    label: str


@dataclass(frozen=True, slots=True)
class Picture:
    width: int
    height: int
    spans: tuple[Span, ...]
    start: str
    end: str


def make_picture(events: Sequence[ev.ExecutionEvent], *, width: int = 1000) -> Picture:
    """One lane per attempt: its span from lease to last event, its waits (from the wait's
    start to its end, or to the last event shown if it has not ended), and its sub-steps
    (from their body's start to their recorded result; a mark at the result in logs older than
    that field)."""
    if not events:
        return Picture(width, 0, (), "", "")
    first, last = events[0].timestamp, events[-1].timestamp
    total = max((last - first).total_seconds(), 1e-3)
    usable = width - 20

    def x_of(moment: datetime) -> float:
        return round(10 + (moment - first).total_seconds() / total * usable, 1)

    lanes: dict[int, list[ev.ExecutionEvent]] = {}
    for event in events:
        attempt = getattr(event, "attempt", None)
        if attempt is not None:
            lanes.setdefault(attempt, []).append(event)
    spans: list[Span] = []
    for lane, (attempt, members) in enumerate(sorted(lanes.items())):
        y = 8 + lane * 30
        begin, end = x_of(members[0].timestamp), x_of(members[-1].timestamp)
        spans.append(Span(begin, max(end - begin, 2.0), y, "attempt", f"attempt {attempt}"))
        waits: dict[tuple[str, int], ev.ExecutionEvent] = {}
        for event in members:
            if isinstance(event, ev.EventAwaited | ev.TimerStarted):
                waits[(event.scope, event.seq)] = event
            elif isinstance(event, ev.WaitEnded):
                started = waits.pop((event.wait_scope, event.wait_seq), None)
                if started is not None:
                    a, b = x_of(started.timestamp), x_of(event.timestamp)
                    spans.append(Span(a, max(b - a, 2.0), y + 4, "wait", "wait"))
            elif isinstance(event, ev.SubStepCompleted | ev.SubStepFailed):
                end = x_of(event.timestamp)
                if event.body_started_ms is None:  # an older log: a mark at the result
                    spans.append(Span(end - 1, 3.0, y - 3, "substep", event.name))
                else:  # the body's run, from its start to its recorded result
                    began = x_of(datetime.fromtimestamp(event.body_started_ms / 1000, UTC))
                    began = min(max(began, 10.0), end)
                    spans.append(Span(began, max(end - began, 3.0), y - 3, "substep", event.name))
        for started in waits.values():  # still waiting at the last event shown
            a = x_of(started.timestamp)
            spans.append(Span(a, max(x_of(last) - a, 2.0), y + 4, "wait", "waiting"))
    return Picture(width, 16 + len(lanes) * 30, tuple(spans), when(first), when(last))
