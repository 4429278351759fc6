"""Replay and verify: re-run the registered handler code read-only against the log.

For each recorded attempt of an execution (from its StepStarted up to the next attempt's, or
the end of the record, or ``at_version``) the handler runs again from the top with a
read-only replay cursor, as a query does (``querying.py``): every recording operation must
find its recorded event at its coordinates and returns the recorded result; nothing is
appended and no ``ctx.do`` body runs. The replay of an attempt stops where the code wants to
do something the record does not have (``ReplayEnd``: for an attempt still open, that is
where the execution is now), or when the handler returns or raises.

A **divergence** is

- an operation whose recorded event is another one (``NonDeterminismError``: "X was
  attempted where Y was recorded at version N"), or
- a recorded operation the code never reached: the handler returned or raised first, or went
  on past it in the same scope, or
- an attempt recorded by a handler version the registered step neither is nor declares
  ``compatible_with``.

An attempt whose record ends in a failure the code does not reproduce (it raised outside any
``ctx.do``, e.g. a network error) is not a divergence: a closed attempt is never resumed, and
nothing it recorded is contradicted. The report says how each attempt ended.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.recorder import Recorder
from stepsource.engine.replay import ReplayCursor, ReplayEnd
from stepsource.engine.runner import run_handler
from stepsource.engine.runtime import Runtime
from stepsource.engine.scope import SCOPE
from stepsource.engine.waiting import Cancelled, Suspended
from stepsource.errors import NonDeterminismError, StepFailedError
from stepsource.projections.folds import replay

__all__ = ["AttemptReplay", "Divergence", "ReplayReport", "replay_execution"]

_ENDS = (ev.AttemptFailed, ev.StepCompleted, ev.StepFailed, ev.StepCancelled)


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first place where the handler code and the record of an execution disagree."""

    execution_id: str
    step_id: str
    attempt: int
    message: str
    #: the recorded operation and its version, when there is one
    recorded: str | None = None
    version: int | None = None
    #: what the code did there instead (None: it never got there)
    attempted: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class AttemptReplay:
    """How the replay of one recorded attempt went."""

    attempt: int
    step_version: str
    from_version: int
    to_version: int
    recorded: int
    matched: int
    outcome: str
    divergence: Divergence | None = None


@dataclass(frozen=True, slots=True)
class ReplayReport:
    execution_id: str
    step_id: str
    step_version: str
    status: str
    events: int
    at_version: int | None
    attempts: tuple[AttemptReplay, ...]

    @property
    def divergence(self) -> Divergence | None:
        for attempt in self.attempts:
            if attempt.divergence is not None:
                return attempt.divergence
        return None

    @property
    def ok(self) -> bool:
        return self.divergence is None


class _VerifyCursor(ReplayCursor):
    """A read-only cursor that remembers what the code last attempted and counts matches."""

    def __init__(self, aggregate: StepExecution, tail: Iterable[ev.ExecutionEvent]) -> None:
        super().__init__(aggregate, tail, read_only=True)
        self.last_attempted: str | None = None
        self.last_scope: str | None = None
        self.matched = 0
        self.mismatched: ev.ExecutionEvent | None = None

    def mismatch(self, attempted: str, recorded: ev.ExecutionEvent) -> NonDeterminismError:
        self.last_attempted, self.mismatched = attempted, recorded
        return super().mismatch(attempted, recorded)

    def match(
        self,
        scope: str,
        seq: int,
        attempted: str,
        expected: type[ev.Recorded],
        identity: object = None,
    ) -> ev.Recorded | None:
        self.last_attempted, self.last_scope = attempted, scope
        found = super().match(scope, seq, attempted, expected, identity)
        self.matched += 1
        return found

    def match_substep(self, name: str) -> ev.SubStepCompleted | ev.SubStepFailed | None:
        self.last_attempted, self.last_scope = f"ctx.do({name!r})", SCOPE.get()
        found = super().match_substep(name)
        if found is not None:
            self.matched += 1
        return found

    def next_for_wait(self, scope: str, seq: int) -> ev.Message | ev.WaitEnded | None:
        found = super().next_for_wait(scope, seq)
        if found is not None:
            self.matched += 1
        return found

    def unreached(self, scope: str | None = None) -> ev.Recorded | None:
        """The earliest recorded operation not matched (in ``scope``, when given)."""
        left = [
            e
            for e in [*self._by_coordinates.values(), *self._substeps.values()]
            if scope is None or (e.scope == scope and e.seq >= 0)
        ]
        return min(left, key=lambda e: e.originator_version) if left else None


def _recorded_ops(tail: Iterable[ev.ExecutionEvent], attempt: int) -> int:
    return sum(1 for e in tail if isinstance(e, ev.Recorded) and e.attempt == attempt)


async def replay_execution(
    runtime: Runtime, execution_id: str, at_version: int | None = None
) -> ReplayReport:
    """Replay every recorded attempt of the execution (up to ``at_version``) read-only."""
    aggregate, events = await runtime.store.load(execution_id, at_version=at_version)
    definition = runtime.definition(
        aggregate.step_id, execution_id=execution_id, doing="replaying its executions"
    )
    starts = [i for i, e in enumerate(events) if isinstance(e, ev.StepStarted)]
    attempts: list[AttemptReplay] = []
    for k, index in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(events)
        tail = events[index + 1 : end]
        closed = end < len(events) or any(isinstance(e, _ENDS) for e in tail)
        result = await _replay_attempt(runtime, definition, events[: index + 1], tail, closed)
        attempts.append(result)
        if result.divergence is not None:
            break
    return ReplayReport(
        execution_id=aggregate.execution_id,
        step_id=aggregate.step_id,
        step_version=aggregate.step_version,
        status=aggregate.status,
        events=len(events),
        at_version=at_version,
        attempts=tuple(attempts),
    )


async def _replay_attempt(
    runtime: Runtime,
    definition: StepDefinition,
    head: list[ev.ExecutionEvent],
    tail: list[ev.ExecutionEvent],
    closed: bool,
) -> AttemptReplay:
    started = head[-1]
    assert isinstance(started, ev.StepStarted)
    number = started.attempt

    def report(outcome: str, matched: int, divergence: Divergence | None = None) -> AttemptReplay:
        return AttemptReplay(
            attempt=number,
            step_version=started.step_version,
            from_version=started.originator_version,
            to_version=(tail[-1] if tail else started).originator_version,
            recorded=_recorded_ops(tail, number),
            matched=matched,
            outcome=outcome,
            divergence=divergence,
        )

    base = replay(head)
    assert base is not None
    base.limits = runtime.store.limits

    def diverge(
        message: str, recorded: str | None, version: int | None, attempted: str | None
    ) -> Divergence:
        return Divergence(
            execution_id=base.execution_id,
            step_id=base.step_id,
            attempt=number,
            message=message,
            recorded=recorded,
            version=version,
            attempted=attempted,
        )

    if not definition.can_resume(started.step_version):
        return report(
            "not replayed",
            0,
            diverge(
                message=f"attempt {number} was recorded by version {started.step_version!r} of "
                f"the handler; the registered handler is version {definition.version!r} and "
                f"does not declare compatible_with=({started.step_version!r},)",
                recorded=f"version {started.step_version!r}",
                version=started.originator_version,
                attempted=f"version {definition.version!r}",
            ),
        )
    cursor = _VerifyCursor(base, tail)
    recorder = Recorder(runtime, definition, base, cursor, list(head))
    run = await run_handler(recorder)
    error = run.error
    if error is None:
        # what the runtime does when the handler returns: every recorded operation must
        # have been reached, and the closing StepCompleted is the next one
        op = recorder.op("complete")
        left = cursor.unreached()
        if left is None or (left.scope, left.seq) == (op[1], op[2]):
            try:
                cursor.match(op[1], op[2], "returning from the handler", ev.StepCompleted, None)
            except NonDeterminismError as mismatch:
                error = mismatch
    outcome = "returned"
    went_live = False
    if isinstance(error, NonDeterminismError):
        recorded = cursor.mismatched
        return report(
            "diverged",
            cursor.matched,
            diverge(
                message=str(error),
                recorded=None if recorded is None else recorded.describe(),
                version=None if recorded is None else recorded.originator_version,
                attempted=cursor.last_attempted,
            ),
        )
    if isinstance(error, (ReplayEnd, Suspended, Cancelled)):
        went_live = True
        outcome = "reached the end of the record"
    elif isinstance(error, StepFailedError):
        outcome = f"failed: {error}"
    elif isinstance(error, Exception):  # the handler's own exception ends the replay
        outcome = f"raised {type(error).__name__}: {error}"
    elif error is not None:  # pragma: no cover - the runner returns no other kind
        raise error
    if went_live:
        # the code wants to go on where the record stops: fine where the record ends too
        left = cursor.unreached(None if closed else (cursor.last_scope or ""))
        attempted = cursor.last_attempted or "an operation"
        if left is None:
            return report(outcome, cursor.matched)
        message = (
            f"{attempted} was attempted where {left.describe()} was recorded at version "
            f"{left.originator_version}"
        )
    else:
        left = cursor.unreached()
        if left is None:
            return report(outcome, cursor.matched)
        attempted = "returning from the handler" if outcome == "returned" else outcome
        message = (
            f"{left.describe()} recorded at version {left.originator_version} was never "
            f"reached: the handler {'returned' if outcome == 'returned' else outcome} first"
        )
    return report(
        "diverged",
        cursor.matched,
        diverge(
            message=f"{message} (execution {base.execution_id}, step {base.step_id!r}, "
            f"attempt {number})",
            recorded=left.describe(),
            version=left.originator_version,
            attempted=attempted,
        ),
    )
