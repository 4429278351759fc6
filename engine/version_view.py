"""An execution at one version beside the version before it, from one load: what the web
UI's version scrubber shows (the state, the execution record and the checkpoints at N, what
N-1 held, and event N between them).

The aggregate is loaded at N-1 from the nearest snapshot (the ladder of
:mod:`~stepsource.engine.snapshot_ladder` when ``snapshot_every`` is set) and the events
after it, its projections at N-1 are taken, and event N is folded on: one load and one
event read per move of the scrubber, where asking ``state_of``, ``describe`` and
``checkpoints_of`` at N and N-1 would make five loads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSONObject
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.errors import UsageError
from stepsource.projections import folds
from stepsource.projections.models import CheckpointInfo, StepRecord

__all__ = ["VersionView", "version_view"]


@dataclass(frozen=True, slots=True)
class VersionView:
    """The execution at ``version`` and at the version before it (None at version 1)."""

    version: int
    event: ev.ExecutionEvent
    state: JSONObject
    record: StepRecord
    checkpoints: list[CheckpointInfo]
    state_before: JSONObject | None
    record_before: StepRecord | None


async def version_view(store: ExecutionStore, execution_id: str, version: int) -> VersionView:
    execution_id = parse_execution_id(execution_id)
    found = await store.events(execution_id, version, version)
    if not found:
        last = (await store.load(execution_id, at_version=None, aggregate_only=True))[0].version
        raise UsageError(
            f"at_version {version} is past the execution's last version {last}",
            execution_id=execution_id,
            hint=f"Pass a version from 1 to {last}",
        )
    (event,) = found
    state_before: JSONObject | None = None
    record_before: StepRecord | None = None
    if version == 1:
        aggregate = folds.replay([event])
    else:
        start, _ = await store.load(execution_id, at_version=version - 1, aggregate_only=True)
        state_before = folds.state_of(start)
        record_before = copy.deepcopy(folds.record_from(start))  # the fold below mutates
        aggregate = folds.replay([event], start=start)
    assert aggregate is not None
    return VersionView(
        version=version,
        event=event,
        state=folds.state_of(aggregate),
        record=folds.record_from(aggregate),
        checkpoints=folds.checkpoints_of(aggregate),
        state_before=state_before,
        record_before=record_before,
    )
