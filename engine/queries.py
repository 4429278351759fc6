"""Read-side queries on an Engine: every answer is a projection of the execution's events."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, cast

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject
from stepsource.engine.readmodels import ProgressCallback, ReadModels, RebuildReport
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.errors import UsageError
from stepsource.projections import folds
from stepsource.projections.models import CheckpointInfo, HistoryEntry, StepRecord
from stepsource.projections.summaries import ExecutionSummary

if TYPE_CHECKING:
    from stepsource.engine.engine import Engine
    from stepsource.engine.verify import Divergence

__all__ = ["ExecutionSummary", "Queries"]


def _check_version(at_version: int | None) -> None:
    if at_version is not None and (
        isinstance(at_version, bool) or not isinstance(at_version, int) or at_version < 1
    ):
        raise UsageError(f"at_version must be an int >= 1, not {at_version!r}")


class Queries:
    """Mixed into Engine: state, history, checkpoints, records and events of executions."""

    _store: ExecutionStore
    _readmodels: ReadModels

    async def state_of(self, execution_id: str, at_version: int | None = None) -> JSONObject:
        """The execution's state dict, now or as it was at ``at_version`` (inclusive)."""
        _check_version(at_version)
        aggregate, _ = await self._store.load(
            execution_id, at_version=at_version, with_events=False
        )
        return folds.state_of(aggregate)

    async def history_of(
        self, execution_id: str, at_version: int | None = None
    ) -> list[HistoryEntry]:
        _check_version(at_version)
        _, events = await self._store.load(execution_id, at_version=at_version)
        return folds.history_of(events)

    async def checkpoints_of(
        self, execution_id: str, at_version: int | None = None
    ) -> list[CheckpointInfo]:
        _check_version(at_version)
        aggregate, _ = await self._store.load(
            execution_id, at_version=at_version, with_events=False
        )
        return folds.checkpoints_of(aggregate)

    async def describe(self, execution_id: str, at_version: int | None = None) -> StepRecord:
        """The execution record (its fields, and every attempt in ``executions``)."""
        _check_version(at_version)
        _, events = await self._store.load(execution_id, at_version=at_version)
        return folds.record_of(events)

    async def events(
        self,
        execution_id: str,
        from_version: int | None = None,
        to_version: int | None = None,
    ) -> list[ev.ExecutionEvent]:
        """The execution's domain events (``originator_version`` from 1), optionally a range."""
        _check_version(from_version)
        _check_version(to_version)
        await self._store.load(parse_execution_id(execution_id), at_version=1)
        return await self._store.events(execution_id, from_version, to_version)

    async def executions(
        self,
        status: str | None = None,
        step_id: str | None = None,
        flow_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
    ) -> list[ExecutionSummary]:
        """Executions matching the filters, newest (latest scheduled) first.

        Served by the executions index, caught up to the log's end first (you read your own
        writes). Page with ``offset``, or with ``cursor=`` the ``execution_id`` of the last
        row of the previous page (stable while new executions are added).
        """
        return await self._readmodels.executions(
            status=status,
            step_id=step_id,
            flow_id=flow_id,
            since=since,
            limit=limit,
            offset=offset,
            cursor=cursor,
        )

    async def rebuild_projections(self, progress: ProgressCallback | None = None) -> RebuildReport:
        """Drop the read models and fold the whole log into them again.

        ``progress(position, target)`` is called after each batch with the log position
        reached and the position the rebuild aims at (the log's end when it began).
        """
        return await self._readmodels.rebuild(progress)

    async def verify(self, execution_id: str, at_version: int | None = None) -> Divergence | None:
        """Re-run the registered handler read-only against each recorded attempt of the
        execution (up to ``at_version``); the first divergence, or None if the code replays
        the record exactly. The step must be registered on this engine."""
        _check_version(at_version)
        from stepsource.engine.verify import replay_execution

        report = await replay_execution(cast("Engine", self), execution_id, at_version)
        return report.divergence
