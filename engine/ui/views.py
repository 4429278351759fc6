"""What each page of the web UI shows, read through the Engine's public queries only
(``executions``, ``describe``, ``events``, ``state_of``, ``history_of``, ``checkpoints_of``,
``flow_state``): no page reads the backend, the read models or a private name."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from stepsource.aggregates import events as ev
from stepsource.engine.ui.render import (
    Chart,
    FieldChange,
    Graph,
    Picture,
    as_json,
    as_plain,
    chart_of,
    diff_fields,
    event_fields,
    layout_graph,
    make_chart,
    make_picture,
)
from stepsource.projections import folds
from stepsource.projections.executions_index import STATUSES as INDEX_STATUSES
from stepsource.projections.models import HistoryEntry, StepRecord
from stepsource.projections.summaries import ExecutionSummary

__all__ = [
    "ListFilters",
    "execution_page",
    "flow_page",
    "list_page",
    "scrub_page",
]


class ServedEngine(Protocol):
    """What the UI uses of an Engine: its public queries and handles (loosely typed here, so
    that this package, which the Engine imports for ``ui_app``, never imports the Engine)."""

    url: str | None

    async def describe(self, *args: Any, **kwargs: Any) -> Any: ...
    async def events(self, *args: Any, **kwargs: Any) -> Any: ...
    async def state_of(self, *args: Any, **kwargs: Any) -> Any: ...
    async def flow_state(self, *args: Any, **kwargs: Any) -> Any: ...
    async def history_of(self, *args: Any, **kwargs: Any) -> Any: ...
    async def checkpoints_of(self, *args: Any, **kwargs: Any) -> Any: ...
    async def executions(self, *args: Any, **kwargs: Any) -> Any: ...
    async def execution_stats(self, *args: Any, **kwargs: Any) -> Any: ...
    async def version_view(self, *args: Any, **kwargs: Any) -> Any: ...
    def get_handle(self, *args: Any, **kwargs: Any) -> Any: ...
    async def fork(self, *args: Any, **kwargs: Any) -> Any: ...
    async def verify(self, *args: Any, **kwargs: Any) -> Any: ...
    def step_ids(self) -> list[str]: ...


#: how many of the newest executions the filters the executions index cannot answer itself
#: look through: the rows of a correlation id; the rows, counts and chart of an id search
SCAN_LIMIT = 5000
PAGE_SIZE = 50
EVENTS_PER_PAGE = 200
#: the scrubber's history: the newest entries up to the version, found among how many events
#: before it (read in windows of HISTORY_WINDOW)
HISTORY_SHOWN = 50
HISTORY_LOOKBACK = 5000
HISTORY_WINDOW = 500
#: every status the index knows, parked and quarantined included
STATUSES = INDEX_STATUSES


@dataclass(frozen=True)
class ListFilters:
    status: str | None = None
    step: str | None = None
    flow: str | None = None
    correlation: str | None = None
    search: str | None = None
    since: datetime | None = None
    page: int = 1

    def query(self, **changes: Any) -> str:
        """The query string of these filters with some changed (for links)."""
        from urllib.parse import urlencode

        values = {
            "status": self.status,
            "step": self.step,
            "flow": self.flow,
            "correlation": self.correlation,
            "q": self.search,
            "since": self.since.isoformat() if self.since else None,
            "page": self.page if self.page != 1 else None,
        }
        values.update(changes)
        return urlencode({k: v for k, v in values.items() if v not in (None, "")})


async def _scan(engine: ServedEngine, filters: ListFilters) -> tuple[list[ExecutionSummary], bool]:
    """The newest executions matching the index's own filters, up to SCAN_LIMIT; and
    whether there were more."""
    rows: list[ExecutionSummary] = []
    cursor: str | None = None
    while True:
        size = min(500, SCAN_LIMIT + 1 - len(rows))
        page = await engine.executions(
            step_id=filters.step,
            flow_id=filters.flow,
            since=filters.since,
            limit=size,
            cursor=cursor,
        )
        rows.extend(page)
        if len(rows) > SCAN_LIMIT:
            return rows[:SCAN_LIMIT], True
        if len(page) < size:
            return rows, False
        cursor = page[-1].execution_id


@dataclass
class ListView:
    filters: ListFilters
    rows: list[ExecutionSummary]
    counts: dict[str, int]
    total: int
    truncated: bool
    chart: Chart
    has_next: bool
    fingerprint: str = ""


async def list_page(engine: ServedEngine, filters: ListFilters) -> ListView:
    """The page of executions: rows from the executions index (a page of it, or the newest
    SCAN_LIMIT for a correlation id); counts and chart counted by the index's database,
    exact for any number of executions, except with an id search, which only the newest
    SCAN_LIMIT are searched for (``truncated`` says so)."""
    start = (filters.page - 1) * PAGE_SIZE
    truncated = False
    if filters.correlation or filters.search:
        scanned, truncated = await _scan(engine, filters)
        term = (filters.search or "").strip()
        matching = [
            row
            for row in scanned
            if (not filters.correlation or row.correlation_id == filters.correlation)
            and (not term or row.execution_id.startswith(term.lower()) or row.key == term)
        ]
        if term:  # a business key's executions, however old: the index finds them by key
            known = {row.execution_id for row in matching}
            keyed = [
                row
                for row in await engine.executions(key=term, limit=SCAN_LIMIT)
                if row.execution_id not in known
                and (not filters.correlation or row.correlation_id == filters.correlation)
                and (not filters.step or row.step_id == filters.step)
                and (not filters.flow or row.flow_id == filters.flow)
                and (filters.since is None or row.created_at >= filters.since)
            ]
            if keyed:
                matching = sorted(matching + keyed, key=lambda r: r.created_at, reverse=True)
        shown = [row for row in matching if not filters.status or row.status == filters.status]
        page, has_next = shown[start : start + PAGE_SIZE], len(shown) > start + PAGE_SIZE
    else:
        found = await engine.executions(
            status=filters.status,
            step_id=filters.step,
            flow_id=filters.flow,
            since=filters.since,
            limit=PAGE_SIZE + 1,
            offset=start,
        )
        page, has_next = found[:PAGE_SIZE], len(found) > PAGE_SIZE
    if filters.search:  # no index query for an id prefix: counted among those looked through
        counts = Counter(row.status for row in matching)
        moments: list[tuple[str, datetime]] = []
        for row in matching:
            moments.append(("started", row.created_at))
            if row.completed_at is not None and row.status in ("completed", "failed"):
                moments.append((row.status, row.completed_at))
        chart, total = make_chart(moments), len(matching)
    else:
        stats = await engine.execution_stats(
            step_id=filters.step,
            flow_id=filters.flow,
            since=filters.since,
            correlation_id=filters.correlation,
        )
        counts, total = Counter(stats.counts), stats.total
        chart, truncated = chart_of(stats.first, stats.last, stats.timeline), False
    view = ListView(
        filters=filters,
        rows=page,
        counts={status: counts.get(status, 0) for status in STATUSES},
        total=total,
        truncated=truncated,
        chart=chart,
        has_next=has_next,
    )
    # a digest: the page carries it to its live stream, which reports any change since
    listed = [(r.execution_id, r.status, r.version) for r in page] + [sorted(counts.items())]
    digest = hashlib.blake2b(as_json(listed, indent=False).encode(), digest_size=16)
    view.fingerprint = digest.hexdigest()
    return view


# -- one execution ------------------------------------------------------------------------------
@dataclass
class Block:
    """Consecutive events of one attempt in one scope: the handler body ("") or a ctx.do."""

    scope: str
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AttemptGroup:
    attempt: int
    blocks: list[Block] = field(default_factory=list)


def _event_row(event: ev.ExecutionEvent) -> dict[str, Any]:
    data = event_fields(event)
    summary = {
        k: v for k, v in data.items() if k not in ("type", "version", "timestamp", "attempt")
    }
    kind = "message" if isinstance(event, ev.Message | ev.UpdateCompleted) else "event"
    if isinstance(event, ev.AttemptFailed | ev.SubStepFailed | ev.StepFailed):
        kind = "error"
    elif isinstance(event, ev.StepLeased | ev.StepStarted):
        kind = "attempt"
    elif isinstance(event, ev.EventAwaited | ev.TimerStarted | ev.WaitEnded | ev.StepSuspended):
        kind = "wait"
    elif isinstance(event, ev.StepCompleted | ev.SubStepCompleted):
        kind = "ok"
    return {
        "version": event.originator_version,
        "type": data["type"],
        "timestamp": event.timestamp,
        "kind": kind,
        "summary": as_json(summary, indent=False),
    }


def group_timeline(events: list[ev.ExecutionEvent], attempt: int) -> list[AttemptGroup]:
    """Events grouped by attempt, then by ``ctx.do`` scope (a sub-step's own end event joins
    the block of its body)."""
    groups: list[AttemptGroup] = []
    for event in events:
        attempt = getattr(event, "attempt", attempt)
        if isinstance(event, ev.StepLeased):
            attempt = event.attempt
        if not groups or groups[-1].attempt != attempt:
            groups.append(AttemptGroup(attempt))
        scope = getattr(event, "scope", "")
        if isinstance(event, ev.SubStepCompleted | ev.SubStepFailed):
            scope = event.name
        blocks = groups[-1].blocks
        if not blocks or blocks[-1].scope != scope:
            blocks.append(Block(scope))
        blocks[-1].events.append(_event_row(event))
    return groups


@dataclass
class ExecutionView:
    record: StepRecord
    groups: list[AttemptGroup]
    page: int
    pages: int
    children: dict[str, Any]
    input_json: str
    output_json: str
    error_json: str
    picture: Picture


async def execution_page(engine: ServedEngine, execution_id: str, page: int) -> ExecutionView:
    record = await engine.describe(execution_id)
    pages = max(1, -(-record.version // EVENTS_PER_PAGE))
    page = min(max(page, 1), pages)
    first = (page - 1) * EVENTS_PER_PAGE + 1
    last = min(page * EVENTS_PER_PAGE, record.version)
    events = await engine.events(execution_id, first, last)
    # the attempt in force before this page: the last lease among the earlier events
    attempt = 0
    if first > 1:
        earlier = await engine.describe(execution_id, at_version=first - 1)
        attempt = earlier.executions[-1].id if earlier.executions else 0
    children: dict[str, Any] = {}
    if any(isinstance(e, ev.ChildStarted) for e in events) or (
        page > 1  # children started on other pages: the index knows them, without a fold
        and (await engine.execution_stats(parent_execution_id=execution_id, buckets=0)).total
    ):
        children = dict((await engine.flow_state(execution_id)).node_states)
    return ExecutionView(
        record=record,
        groups=group_timeline(events, attempt),
        page=page,
        pages=pages,
        children=children,
        input_json=as_json(record.input),
        output_json=as_json(record.output),
        error_json=as_json(record.error) if record.error else "",
        picture=make_picture(events),
    )


# -- the version scrubber -----------------------------------------------------------------------
@dataclass
class ScrubView:
    record: StepRecord
    version: int
    last: int
    state: list[FieldChange]
    record_fields: list[FieldChange]
    checkpoints: list[dict[str, Any]]
    history: list[dict[str, Any]]
    event_json: str
    event_type: str
    older_history: bool = False


def _record_map(record: StepRecord) -> dict[str, Any]:
    data = as_plain(record)
    assert isinstance(data, dict)
    data.pop("step_definition_snapshot", None)
    return data


async def _recent_history(
    engine: ServedEngine, execution_id: str, version: int
) -> tuple[list[HistoryEntry], bool]:
    """The newest HISTORY_SHOWN history entries up to ``version``, read backwards through
    the events in windows, at most HISTORY_LOOKBACK events (never the whole log up to a
    version: that is what makes a scrubber slow on a long execution); and whether older
    entries may exist."""
    entries: list[HistoryEntry] = []
    high, low_limit = version, max(1, version - HISTORY_LOOKBACK + 1)
    window = 2 * HISTORY_SHOWN  # most events make an entry: start small, then widen
    while high >= low_limit and len(entries) <= HISTORY_SHOWN:
        low = max(low_limit, high - window + 1)
        entries = folds.history_of(await engine.events(execution_id, low, high)) + entries
        high, window = low - 1, min(2 * window, HISTORY_WINDOW)
    return entries[-HISTORY_SHOWN:], len(entries) > HISTORY_SHOWN or high >= 1


async def scrub_page(engine: ServedEngine, execution_id: str, version: int | None) -> ScrubView:
    latest = await engine.describe(execution_id)
    n = latest.version if version is None else min(max(version, 1), latest.version)
    at = await engine.version_view(execution_id, n)  # one load: N-1 and event N folded on
    history, older = await _recent_history(engine, execution_id, n)
    before = at.record_before
    return ScrubView(
        record=latest,
        version=n,
        last=latest.version,
        state=diff_fields(at.state, at.state_before if n > 1 else {}),
        record_fields=diff_fields(_record_map(at.record), _record_map(before) if before else None),
        checkpoints=[
            {"info": cp, "new": cp.version == n, "json": as_json(as_plain(cp))}
            for cp in at.checkpoints
        ],
        history=[
            {"entry": h, "new": h.version == n, "details": as_json(h.details, indent=False)}
            for h in history
        ],
        event_json=as_json(event_fields(at.event)),
        event_type=type(at.event).__name__,
        older_history=older,
    )


# -- a flow -----------------------------------------------------------------------------------
@dataclass
class FlowView:
    record: StepRecord
    graph: Graph
    nodes: dict[str, Any]
    output_json: str


async def flow_page(engine: ServedEngine, execution_id: str) -> FlowView:
    record = await engine.describe(execution_id)
    flow = await engine.flow_state(execution_id)
    root = f"flow:{execution_id}"
    nodes: list[tuple[str, str, str, str | None]] = [
        (root, record.flow_id or record.step_id, record.status, execution_id)
    ]
    depends: dict[str, list[str]] = {}
    # the DAG as declared, recorded with the flow's definition (flows started before it was
    # are drawn from what their nodes were started with: the completed upstreams only)
    declared = record.step_definition_snapshot.get("nodes")
    graph = declared if isinstance(declared, dict) else {}
    for key, node in flow.node_states.items():
        child_id = str(node.get("execution_id") or "")
        nodes.append((key, key, str(node.get("status")), child_id or None))
        upstream: list[str] = []
        spec = graph.get(key)
        if isinstance(spec, dict):
            upstream = [str(d) for d in spec.get("depends_on") or []]
        elif child_id:
            (scheduled,) = await engine.events(child_id, 1, 1)
            if isinstance(scheduled, ev.StepScheduled):
                upstream = [d for d in scheduled.dependencies if d in flow.node_states]
        depends[key] = upstream or [root]
    table = dict(flow.node_states)
    for key, spec in graph.items():  # a node never started: its upstream failed or waits
        if key not in flow.node_states and isinstance(spec, dict):
            nodes.append((key, key, "not started", None))
            depends[key] = [str(d) for d in spec.get("depends_on") or []] or [root]
            table[key] = {"status": "not started", "step_id": spec.get("step")}
    return FlowView(
        record=record,
        graph=layout_graph(nodes, depends),
        nodes=table,
        output_json=as_json(flow.output),
    )
