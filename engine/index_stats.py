"""Counts of the executions index: how many executions have each status, and how many
started, completed and failed in each stretch of time, counted by the index's database
(``tally`` / ``bounds`` of the local SQLite index or of the backend's
:class:`~stepsource.adapters.ports.ReadModelStore`), never by reading rows: exact whatever
the number of executions, and as cheap for a million as the database makes a ``GROUP BY``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio.to_thread

from stepsource.engine.readmodels import ReadModels
from stepsource.errors import UsageError
from stepsource.projections.executions_index import STATUSES, IndexFilter, from_micros

__all__ = ["TIMELINE_KINDS", "ExecutionStats", "execution_stats"]

#: what the timeline counts: executions created, and those that ended completed or failed
TIMELINE_KINDS = ("started", "completed", "failed")


@dataclass(frozen=True, slots=True)
class ExecutionStats:
    """The counts of the executions matching a filter.

    ``counts``: every status (0 included); ``timeline``: per equal stretch of time from
    ``first`` to ``last``, the executions created (``started``) and those that completed or
    failed in it (at ``completed_at``); empty when nothing matches.
    """

    counts: dict[str, int]
    total: int
    first: datetime | None
    last: datetime | None
    timeline: tuple[dict[str, int], ...]


async def execution_stats(
    readmodels: ReadModels,
    *,
    step_id: str | None = None,
    flow_id: str | None = None,
    since: datetime | None = None,
    correlation_id: str | None = None,
    parent_execution_id: str | None = None,
    buckets: int = 24,
) -> ExecutionStats:
    """The counts of the executions matching the filters, the index caught up first (with
    ``buckets=0``, the counts per status only)."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 0 <= buckets <= 1000:
        raise UsageError(f"buckets must be an int from 0 to 1000, not {buckets!r}")
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise UsageError(
            f"since must be a timezone-aware datetime, not {since!r}",
            hint="For example datetime(2025, 1, 1, tzinfo=UTC)",
        )
    await readmodels.catch_up()
    index = readmodels.index
    where = IndexFilter(step_id=step_id, flow_id=flow_id, since=since)
    equals: dict[str, Any] = where.equals()
    if correlation_id is not None:
        equals["correlation_id"] = correlation_id
    if parent_execution_id is not None:
        equals["parent_execution_id"] = parent_execution_id
    at_least = where.at_least()
    spans = (
        ("started", equals, "created_at"),
        ("completed", {**equals, "status": "completed"}, "completed_at"),
        ("failed", {**equals, "status": "failed"}, "completed_at"),
    )

    def count() -> ExecutionStats:
        by_status = index.tally(equals, at_least, "status")
        counts = {status: by_status.get(status, 0) for status in STATUSES}
        total = sum(by_status.values())
        if not buckets:
            return ExecutionStats(counts, total, None, None, ())
        found = [(kind, eq, col, index.bounds(eq, at_least, col)) for kind, eq, col in spans]
        ranges = [bound for *_, bound in found if bound is not None]
        if not ranges:
            return ExecutionStats(counts, total, None, None, ())
        first, last = min(low for low, _ in ranges), max(high for _, high in ranges)
        width = max(-(-(last - first + 1) // buckets), 1)  # micros: the last fits the last
        timeline = [dict.fromkeys(TIMELINE_KINDS, 0) for _ in range(buckets)]
        for kind, eq, column, bound in found:
            if bound is not None:
                for number, n in index.tally(eq, at_least, column, (first, width, buckets)).items():
                    timeline[int(number)][kind] += n
        return ExecutionStats(counts, total, from_micros(first), from_micros(last), tuple(timeline))

    return await anyio.to_thread.run_sync(count)
