"""Read-side queries on an Engine: every answer is a projection of the execution's events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject
from stepsource.engine.index_stats import ExecutionStats, execution_stats
from stepsource.engine.quarantine import release
from stepsource.engine.readmodels import ProgressCallback, ReadModels, RebuildReport
from stepsource.engine.runtime import Runtime
from stepsource.engine.store import ExecutionStore, check_version, parse_execution_id
from stepsource.engine.verify import Divergence, ReplayReport, replay_execution
from stepsource.engine.version_view import VersionView, version_view
from stepsource.errors import UsageError
from stepsource.projections import folds
from stepsource.projections.flows import children_of, workflow_state
from stepsource.projections.models import CheckpointInfo, HistoryEntry, StepRecord, WorkflowState
from stepsource.projections.summaries import ExecutionSummary

__all__ = ["ExecutionSummary", "Queries"]


def _within(execution_id: str, at_version: int | None, last: int) -> None:
    """Refuse ``at_version`` past the execution's last version, as 0 is refused."""
    if at_version is not None and at_version > last:
        raise UsageError(
            f"at_version {at_version} is past the execution's last version {last}",
            execution_id=execution_id,
            hint=f"Pass a version from 1 to {last}, or none for the current state",
        )


class Queries:
    """The read side of an Engine (its base class): state, history, checkpoints, records,
    flows and events of executions, the executions index, and replays of handler code.

    It receives the services it reads through: the execution store, the read models, and
    the runtime a replay runs the registered handlers with.
    """

    def __init__(
        self, store: ExecutionStore, readmodels: ReadModels, runtime: Callable[[], Runtime]
    ) -> None:
        self._store = store
        self._readmodels = readmodels
        self._replay_runtime = runtime

    async def state_of(self, execution_id: str, at_version: int | None = None) -> JSONObject:
        """The execution's state dict, now or as it was at ``at_version`` (inclusive)."""
        check_version(at_version, execution_id)
        aggregate, _ = await self._store.load(
            execution_id, at_version=at_version, aggregate_only=True
        )
        _within(aggregate.execution_id, at_version, aggregate.version)
        return folds.state_of(aggregate)

    async def history_of(
        self, execution_id: str, at_version: int | None = None
    ) -> list[HistoryEntry]:
        check_version(at_version, execution_id)
        aggregate, events = await self._store.load(execution_id, at_version=at_version)
        _within(aggregate.execution_id, at_version, aggregate.version)
        return folds.history_of(events)

    async def checkpoints_of(
        self, execution_id: str, at_version: int | None = None
    ) -> list[CheckpointInfo]:
        check_version(at_version, execution_id)
        aggregate, _ = await self._store.load(
            execution_id, at_version=at_version, aggregate_only=True
        )
        _within(aggregate.execution_id, at_version, aggregate.version)
        return folds.checkpoints_of(aggregate)

    async def describe(self, execution_id: str, at_version: int | None = None) -> StepRecord:
        """The execution record (its fields, and every attempt in ``executions``); with
        snapshots on, from the nearest snapshot at or below the version and the events after
        it."""
        check_version(at_version, execution_id)
        aggregate, _ = await self._store.load(
            execution_id, at_version=at_version, aggregate_only=True
        )
        _within(aggregate.execution_id, at_version, aggregate.version)
        return folds.record_from(aggregate)

    async def version_view(self, execution_id: str, at_version: int) -> VersionView:
        """The state, record and checkpoints at ``at_version`` beside the state and record
        of the version before, and the event between them, from one load (the nearest
        snapshot): what a move of the UI's version scrubber shows."""
        check_version(at_version, execution_id)
        return await version_view(self._store, execution_id, at_version)

    async def events(
        self,
        execution_id: str,
        from_version: int | None = None,
        to_version: int | None = None,
    ) -> list[ev.ExecutionEvent]:
        """The execution's domain events (``originator_version`` from 1), optionally a range."""
        check_version(from_version, execution_id, "from_version")
        check_version(to_version, execution_id, "to_version")
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
        key: str | None = None,
    ) -> list[ExecutionSummary]:
        """Executions matching the filters, newest (latest scheduled) first; ``key``: those
        started with that business key (one per step).

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
            key=key,
        )

    async def execution_stats(
        self,
        step_id: str | None = None,
        flow_id: str | None = None,
        since: datetime | None = None,
        correlation_id: str | None = None,
        parent_execution_id: str | None = None,
        buckets: int = 24,
    ) -> ExecutionStats:
        """How many executions matching the filters have each status, and how many were
        started, completed and failed over time (``buckets`` equal stretches; 0: counts
        only): counted by the executions index's database, exact for any number of
        executions."""
        return await execution_stats(
            self._readmodels,
            step_id=step_id,
            flow_id=flow_id,
            since=since,
            correlation_id=correlation_id,
            parent_execution_id=parent_execution_id,
            buckets=buckets,
        )

    async def release_quarantine(self, execution_id: str, now_ms: int) -> int:
        """Make a quarantined execution runnable again once its whole log reads (else the
        error that still stands is raised), and its index row shows it again; return the
        version its log reads to."""
        execution_id = parse_execution_id(execution_id)
        version = await release(self._store, execution_id, now_ms)
        await self._readmodels.refresh(await self._store.events(execution_id))
        return version

    async def rebuild_projections(self, progress: ProgressCallback | None = None) -> RebuildReport:
        """Drop the read models and fold the whole log into them again.

        ``progress(position, target)`` is called after each batch with the log position
        reached and the position the rebuild aims at (the log's end when it began).
        """
        return await self._readmodels.rebuild(progress)

    async def flow_state(self, execution_id: str) -> WorkflowState:
        """The flow's status, input, output, node states and checkpoints, from the events of
        the flow and of its children."""
        _, events = await self._store.load(execution_id)
        children: dict[str, StepRecord] = {}
        for _key, child_id in children_of(events):
            _, child_events = await self._store.load(child_id)
            children[child_id] = folds.record_of(child_events)
        return workflow_state(events, children)

    async def replay(self, execution_id: str, at_version: int | None = None) -> ReplayReport:
        """Re-run the registered handler read-only against each recorded attempt of the
        execution (up to ``at_version``) and report how each went. The step must be
        registered on this engine."""
        check_version(at_version, execution_id)
        report = await replay_execution(self._replay_runtime(), execution_id, at_version)
        _within(report.execution_id, at_version, report.events)  # a version it does not have
        return report

    async def verify(self, execution_id: str, at_version: int | None = None) -> Divergence | None:
        """The first divergence between the registered handler and the execution's record
        (up to ``at_version``), or None if the code replays the record exactly."""
        return (await self.replay(execution_id, at_version)).divergence
