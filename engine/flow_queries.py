"""``engine.flow_state``: the WorkflowState of a flow execution (seed 003)."""

from __future__ import annotations

from stepsource.engine.store import ExecutionStore
from stepsource.projections.flows import children_of, workflow_state
from stepsource.projections.folds import record_of
from stepsource.projections.models import StepRecord, WorkflowState

__all__ = ["FlowQueries"]


class FlowQueries:
    _store: ExecutionStore

    async def flow_state(self, execution_id: str) -> WorkflowState:
        """The flow's status, input, output, node states and checkpoints, from the events of
        the flow and of its children."""
        _, events = await self._store.load(execution_id)
        children: dict[str, StepRecord] = {}
        for _key, child_id in children_of(events):
            _, child_events = await self._store.load(child_id)
            children[child_id] = record_of(child_events)
        return workflow_state(events, children)
