"""``ExecutionMachine``: a hypothesis state machine that drives executions on any backend.

Rules act as a worker would — start executions, set/update state, create and restore
checkpoints, add history entries, complete or fail — and as faults do: ``crash_and_reopen``
drops everything in memory and reopens the backend; ``stale_append`` commits from an outdated
copy of an execution and must be refused. After every step the invariants compare the log's
projections with a plain-dict model: replay equals the model, versions run 1..n, ended
executions refuse everything and stay as they were, and a projection rebuilt from scratch
equals the live aggregate.

Subclass it and override :meth:`make_backend` to run it on your backend (``memory://``
by default); :data:`RULE_COUNTS` counts how often each rule fired, across runs.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend, QueueUpdate
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.engine import Engine
from stepsource.errors import UsageError, VersionConflictError
from stepsource.projections.folds import checkpoints_of, history_of, state_of
from stepsource.testing.strategies import json_objects, json_values, state_keys

__all__ = ["RULE_COUNTS", "ExecutionMachine"]

RULE_COUNTS: Counter[str] = Counter()
WORKER = "machine-worker"
STEP = "machine.step"


@dataclass
class _Model:
    state: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    history: list[str] = field(default_factory=lambda: ["started"])
    terminal: str | None = None
    seq: int = 0


def _now() -> datetime:
    return datetime.now(UTC)


class ExecutionMachine(RuleBasedStateMachine):
    executions = Bundle("executions")

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.backend = self.make_backend()
        self.engine = Engine(backend=self.backend, workers=0)
        self.models: dict[str, _Model] = {}
        self.live: dict[str, StepExecution] = {}

    def make_backend(self) -> Backend:
        """The backend under test; a fresh, empty one per example."""
        return MemoryBackend()

    def teardown(self) -> None:
        try:
            self.portal.call(self.engine.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    # -- plumbing ---------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        RULE_COUNTS[name] += 1
        event(name)

    def _commit(self, eid: str, queue: QueueUpdate | None = None, *, leased: bool = True) -> None:
        owner = WORKER if leased else None
        self.portal.call(
            lambda: self.engine.store.commit(self.live[eid], queue=queue, lease_owner=owner)
        )

    def _op(self, eid: str) -> tuple[int, str, int, str]:
        model = self.models[eid]
        model.seq += 1
        return (self.live[eid].attempt, "", model.seq, "1")

    def _refused_if_ended(self, eid: str, action: Any) -> bool:
        """Run ``action`` on an ended execution: it must be refused with nothing appended."""
        if self.models[eid].terminal is None:
            return False
        before = self.portal.call(self.backend.stream_version, eid)
        try:
            action()
        except UsageError:
            pass
        else:  # pragma: no cover - the invariant this machine exists to catch
            raise AssertionError(f"an operation on an ended execution {eid} was accepted")
        self.live[eid].collect_events()
        assert self.portal.call(self.backend.stream_version, eid) == before
        return True

    # -- rules ------------------------------------------------------------------------------
    @rule(target=executions)
    def start(self) -> str:
        self._count("start")
        eid = uuid.uuid4()
        aggregate = StepExecution.schedule(
            execution_id=eid,
            timestamp=_now(),
            step_id=STEP,
            step_version="1",
            definition={},
            input={},
            config={},
        )
        key = str(eid)
        self.live[key] = aggregate
        self._commit(key, QueueUpdate(kind="enqueue", step_id=STEP), leased=False)
        leased = self.portal.call(self.backend.lease, WORKER, [STEP], 2**60, 10**9, 1000)
        assert key in {lease.stream_id for lease in leased}
        aggregate.lease(timestamp=_now(), worker_id=WORKER, executor="machine", lease_expires_ms=0)
        aggregate.start_attempt(timestamp=_now(), worker_id=WORKER, step_version="1")
        self._commit(key)
        self.models[key] = _Model()
        return key

    @rule(eid=executions, key=state_keys(), value=json_values())
    def set_state(self, eid: str, key: str, value: Any) -> None:
        self._count("set_state")
        agg = self.live[eid]
        if self._refused_if_ended(
            eid, lambda: agg.set_state(key, value, timestamp=_now(), op=self._op(eid))
        ):
            return
        agg.set_state(key, value, timestamp=_now(), op=self._op(eid))
        self._commit(eid)
        self.models[eid].state[key] = copy.deepcopy(value)
        self.models[eid].history.append("state-set")

    @rule(eid=executions, values=st.dictionaries(state_keys(), json_values(), max_size=3))
    def update_state(self, eid: str, values: dict[str, Any]) -> None:
        self._count("update_state")
        agg = self.live[eid]
        if self._refused_if_ended(
            eid, lambda: agg.update_state(values, timestamp=_now(), op=self._op(eid))
        ):
            return
        agg.update_state(values, timestamp=_now(), op=self._op(eid))
        self._commit(eid)
        self.models[eid].state.update(copy.deepcopy(values))
        self.models[eid].history.append("state-set")

    @rule(eid=executions, metadata=json_objects(4))
    def checkpoint(self, eid: str, metadata: dict[str, Any]) -> None:
        self._count("checkpoint")
        agg = self.live[eid]
        checkpoint_id = str(uuid.uuid4())

        def create() -> None:
            agg.create_checkpoint(
                checkpoint_id,
                metadata=metadata,
                cursor=None,
                items_processed=None,
                accumulated_results=None,
                timestamp=_now(),
                op=self._op(eid),
            )

        if self._refused_if_ended(eid, create):
            return
        create()
        self._commit(eid)
        model = self.models[eid]
        model.checkpoints.append((checkpoint_id, copy.deepcopy(model.state)))
        model.history.append("checkpoint")

    @rule(eid=executions, index=st.integers(0, 20))
    def restore(self, eid: str, index: int) -> None:
        self._count("restore")
        model = self.models[eid]
        if not model.checkpoints:
            return
        checkpoint_id, saved = model.checkpoints[index % len(model.checkpoints)]
        agg = self.live[eid]

        def restore() -> None:
            agg.restore_checkpoint(checkpoint_id, timestamp=_now(), op=self._op(eid))

        if self._refused_if_ended(eid, restore):
            return
        restore()
        self._commit(eid)
        model.state = copy.deepcopy(saved)
        model.history.append("restored")

    @rule(eid=executions, kind=st.sampled_from(["custom", "audit"]), details=json_objects(4))
    def add_history(self, eid: str, kind: str, details: dict[str, Any]) -> None:
        self._count("add_history")
        agg = self.live[eid]

        def add() -> None:
            agg.add_history_entry(kind, details, timestamp=_now(), op=self._op(eid))

        if self._refused_if_ended(eid, add):
            return
        add()
        self._commit(eid)
        self.models[eid].history.append(kind)

    @rule(eid=executions, output=json_values())
    def complete(self, eid: str, output: Any) -> None:
        self._count("complete")
        agg = self.live[eid]
        if self._refused_if_ended(
            eid, lambda: agg.complete(output, timestamp=_now(), op=self._op(eid))
        ):
            return
        agg.complete(output, timestamp=_now(), op=self._op(eid))
        self._commit(eid, QueueUpdate(kind="done"))
        self.models[eid].terminal = "completed"
        self.models[eid].history.append("completed")

    @rule(eid=executions, reason=st.text(max_size=10))
    def fail(self, eid: str, reason: str) -> None:
        self._count("fail")
        agg = self.live[eid]

        def fail() -> None:
            agg.fail(reason, None, error_type="fail", timestamp=_now(), op=self._op(eid))

        if self._refused_if_ended(eid, fail):
            return
        fail()
        self._commit(eid, QueueUpdate(kind="done"))
        self.models[eid].terminal = "failed"
        self.models[eid].history.append("failed")

    @rule()
    def crash_and_reopen(self) -> None:
        """Lose everything in memory, as a killed worker would, and reload from the log."""
        self._count("crash_and_reopen")
        self.portal.call(self.engine.aclose)
        self.engine = Engine(backend=self.backend, workers=0)
        for eid in list(self.live):
            aggregate, _ = self.portal.call(self.engine.store.load, eid)
            self.live[eid] = aggregate

    @rule(eid=executions, key=state_keys())
    def stale_append(self, eid: str, key: str) -> None:
        """A writer holding an outdated copy is refused and changes nothing."""
        self._count("stale_append")
        if self.models[eid].terminal is not None:
            return
        stale, _ = self.portal.call(self.engine.store.load, eid)
        self.set_state(eid, key, "fresh")  # the live writer moves the stream on
        before = self.portal.call(self.backend.stream_version, eid)
        stale.set_state(key, "stale", timestamp=_now(), op=(stale.attempt, "", 10**6, "1"))
        try:
            self.portal.call(lambda: self.engine.store.commit(stale, lease_owner=WORKER))
        except VersionConflictError:
            pass
        else:  # pragma: no cover - the invariant this machine exists to catch
            raise AssertionError("a stale append was accepted")
        assert self.portal.call(self.backend.stream_version, eid) == before

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def the_log_projects_what_the_model_says(self) -> None:
        for eid, model in self.models.items():
            # one read of the log per execution; every projection is folded from it
            rebuilt, events = self.portal.call(self.engine.store.load, eid)
            versions = [e.originator_version for e in events]
            assert versions == list(range(1, len(events) + 1)), "versions must run 1..n"
            assert state_of(rebuilt) == model.state
            assert [e.type for e in history_of(events)] == model.history
            assert [(c.id, c.state) for c in checkpoints_of(rebuilt)] == model.checkpoints
            live = self.live[eid]  # the incremental view: folded event by event as recorded
            assert rebuilt.state == live.state  # rebuilt from scratch equals incremental
            assert rebuilt.version == live.version
            assert rebuilt.checkpoints == live.checkpoints
            assert rebuilt.status == live.status == (model.terminal or "executing")
