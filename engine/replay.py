"""Matching a re-run handler's operations against what its attempt already recorded.

When a worker resumes an attempt that another worker left unfinished, the handler runs again
from the top. Each recording operation has coordinates (scope, seq): the enclosing ``ctx.do``
name and its ordinal there. If the log has an event at those coordinates, the operation is
*matched*: it returns the recorded result and appends nothing, and the aggregate is advanced
to that event so context reads see what they saw then. The first operation with no recorded
event switches to live recording (after folding in whatever remains of the log).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.failures import Unwinding
from stepsource.errors import NonDeterminismError

__all__ = ["ReplayCursor", "ReplayEnd"]


class ReplayEnd(Unwinding):
    """A read-only replay (a query) reached the point where the execution is now."""


class ReplayCursor:
    """The recorded tail of an attempt, consumed as the re-run handler reaches each operation."""

    def __init__(
        self,
        aggregate: StepExecution,
        tail: Iterable[ev.ExecutionEvent],
        *,
        read_only: bool = False,
        applied: list[ev.ExecutionEvent] | None = None,
    ) -> None:
        self.read_only = read_only
        self.created_at = time.perf_counter()
        #: when the run first did something live (None while it only replays)
        self.live_at: float | None = None
        self._aggregate = aggregate
        self._tail: deque[ev.ExecutionEvent] = deque(tail)
        attempt = aggregate.next_attempt_number()
        mine = [e for e in self._tail if isinstance(e, ev.Recorded) and e.attempt == attempt]
        self._by_coordinates: dict[tuple[str, int], ev.Recorded] = {
            (e.scope, e.seq): e for e in mine if e.seq >= 0
        }
        self._substeps: dict[str, ev.SubStepCompleted | ev.SubStepFailed] = {
            e.name: e for e in mine if isinstance(e, (ev.SubStepCompleted, ev.SubStepFailed))
        }
        self._patches = {e.change_id for e in mine if isinstance(e, ev.PatchMarked)}
        #: the recorded messages not delivered again yet, in order: a batch pulled from the
        #: inbox is recorded before its handlers run, so matching the first handler's
        #: operations folds the later messages in; they are still to be delivered
        self._undelivered: deque[ev.Message] = deque(
            e for e in self._tail if isinstance(e, ev.Message)
        )
        #: events folded into the aggregate so far, in version order (shared with the attempt)
        self.applied: list[ev.ExecutionEvent] = [] if applied is None else applied

    @property
    def replaying(self) -> bool:
        return self.read_only or bool(self._by_coordinates or self._substeps)

    def going_live(self) -> None:
        """Called before anything is done live; a read-only replay stops here."""
        if self.read_only:
            raise ReplayEnd
        if self.live_at is None:
            self.live_at = time.perf_counter()

    @property
    def replay_seconds(self) -> float:
        """How long the run replayed recorded operations before it went live (or so far)."""
        end = self.live_at if self.live_at is not None else time.perf_counter()
        return end - self.created_at

    def next_for_wait(self, scope: str, seq: int) -> ev.Message | ev.WaitEnded | None:
        """The next recorded message not delivered again yet, or the end of the wait at
        (scope, seq) if it comes first; None when the record has neither."""
        message = self._undelivered[0] if self._undelivered else None
        for event in self._tail:
            if message is not None and event.originator_version >= message.originator_version:
                break
            if isinstance(event, ev.WaitEnded) and (event.wait_scope, event.wait_seq) == (
                scope,
                seq,
            ):
                self._advance_to(event.originator_version)
                return event
        return self.next_message()

    def next_message(self) -> ev.Message | None:
        """The next recorded message not delivered again yet (None: none is left)."""
        if not self._undelivered:
            return None
        message = self._undelivered.popleft()
        self._advance_to(message.originator_version)  # folded already if a handler's
        return message

    def find_update_completion(self, update_id: str) -> ev.UpdateCompleted | None:
        for event in self._tail:
            if isinstance(event, ev.UpdateCompleted) and event.update_id == update_id:
                self._advance_to(event.originator_version)
                return event
        return None

    def recorded_patch(self, change_id: str) -> bool:
        """Whether this attempt's record holds ctx.patched(change_id) taking the new path."""
        return change_id in self._patches

    def replaying_ahead(self) -> bool:
        """Whether operations this attempt recorded are still ahead of the re-run handler:
        the code that recorded them has passed the current point already."""
        return bool(self._by_coordinates or self._substeps)

    def drain(self) -> None:
        """Fold in the rest of the log without going live (a query's final state)."""
        self._advance_to(None)

    def match_substep(self, name: str) -> ev.SubStepCompleted | ev.SubStepFailed | None:
        """The recorded outcome of ``ctx.do(name)`` in this attempt, if it finished."""
        recorded = self._substeps.pop(name, None)
        if recorded is not None:
            self._forget_scope(name)  # its body is not run again: nothing in it to match
            self._advance_to(recorded.originator_version)
        return recorded

    def pending_tries(self, name: str) -> list[ev.SubStepTryFailed]:
        """Failed tries of ``ctx.do(name, retry=...)`` in the log not folded in yet."""
        return [e for e in self._tail if isinstance(e, ev.SubStepTryFailed) and e.name == name]

    def _forget_scope(self, scope: str) -> None:
        for key in [k for k in self._by_coordinates if k[0] == scope]:
            del self._by_coordinates[key]
        for child in [n for n, e in self._substeps.items() if e.scope == scope]:
            del self._substeps[child]
            self._forget_scope(child)

    def match(
        self,
        scope: str,
        seq: int,
        attempted: str,
        expected: type[ev.Recorded],
        identity: object = None,
    ) -> ev.Recorded | None:
        """The recorded event for this operation, None if it is new, or NonDeterminismError."""
        recorded = self._by_coordinates.pop((scope, seq), None)
        if recorded is None:
            self.going_live()
            self.finish_replay()
            return None
        if not isinstance(recorded, expected) or recorded.identity() != identity:
            self._by_coordinates[(scope, seq)] = recorded
            raise self.mismatch(attempted, recorded)
        self._advance_to(recorded.originator_version)
        return recorded

    def mismatch(self, attempted: str, recorded: ev.ExecutionEvent) -> NonDeterminismError:
        where = (
            f" inside ctx.do({recorded.scope!r})"
            if isinstance(recorded, ev.Recorded) and recorded.scope
            else ""
        )
        return NonDeterminismError(
            f"{attempted} was attempted where {recorded.describe()} was recorded at "
            f"version {recorded.originator_version}{where}",
            execution_id=self._aggregate.execution_id,
            step_id=self._aggregate.step_id,
            hint="The handler code changed since this execution ran; deploy a compatible "
            "handler or give the step a new version",
        )

    def leftover(self) -> ev.Recorded | None:
        """A recorded operation the re-run handler never reached (it ended earlier)."""
        unmatched: list[ev.Recorded] = [*self._by_coordinates.values(), *self._substeps.values()]
        if not unmatched:
            return None
        return min(unmatched, key=lambda e: e.originator_version)

    def finish_replay(self) -> None:
        """Fold in everything left of the log: what comes next is recorded live."""
        self.going_live()
        self._advance_to(None)

    def _advance_to(self, version: int | None) -> None:
        while self._tail and (version is None or self._tail[0].originator_version <= version):
            event = self._tail.popleft()
            event.mutate(self._aggregate)
            self.applied.append(event)
