"""The base classes of a step execution's events: every event and every operation a
handler's context records (with the coordinates replay matches). The events themselves are in
:mod:`stepsource.aggregates.events` (the lifecycle of an execution) and
:mod:`stepsource.aggregates.operation_events` (what a handler's operations and messages record).
"""

from __future__ import annotations

from typing import Any, ClassVar

from eventsourcing.domain import AggregateEvent, OriginatorIDError, OriginatorVersionError

from stepsource.aggregates.values import JSONObject

__all__ = ["TOPIC_PREFIX", "ExecutionEvent", "Recorded"]

TOPIC_PREFIX = "stepsource:"


class ExecutionEvent(AggregateEvent):
    """Base of every StepExecution event."""

    TOPIC = "stepsource:ExecutionEvent"
    class_version = 1
    PROGRESS: ClassVar[bool] = False
    """Whether the event is progress of the attempt: workers lost before it no longer count
    as lost "in a row" (``leases_lost``)."""

    def mutate(self, aggregate: Any) -> Any:
        """The library's mutation of an existing aggregate, in one call with no property
        lookups, since replay folds thousands: the same checks and errors (the event must be
        the aggregate's and its next version), then ``apply``, then the aggregate takes the
        event's version and timestamp. Creation (:class:`StepScheduled`) keeps the library's.

        The aggregate's id, version and modification time are read and written through the
        library's public ``id``, ``version`` and ``modified_on`` properties.
        """
        assert aggregate is not None
        originator_id = self.originator_id
        aggregate_id = aggregate.id
        # the events of one read share their id object with the aggregate: skip UUID.__eq__
        if originator_id is not aggregate_id and originator_id != aggregate_id:
            raise OriginatorIDError(originator_id, aggregate_id)
        next_version = aggregate.version + 1
        if self.originator_version != next_version:
            raise OriginatorVersionError(self.originator_version, next_version)
        self.apply(aggregate)
        aggregate.version = self.originator_version
        aggregate.modified_on = self.timestamp
        if self.PROGRESS:
            aggregate.leases_lost = 0
        return aggregate

    def describe(self) -> str:
        """One line naming the operation that recorded this event, as a handler writes it
        (what a nondeterminism error or a replay report shows)."""
        return type(self).__name__

    def history(self) -> tuple[str, JSONObject] | None:
        """The history entry this event projects to, as ``(type, details)``; None for the
        bookkeeping events that make no entry."""
        return None


class Recorded(ExecutionEvent):
    """An event a handler's context operation recorded, with the coordinates replay matches.

    ``scope`` is the enclosing ``ctx.do`` name ("" for the handler body), ``seq`` the
    operation's ordinal within that scope in this ``attempt``, ``step_version`` the version
    of the handler code that recorded it.
    """

    TOPIC = "stepsource:Recorded"
    PROGRESS = True
    attempt: int
    scope: str
    seq: int
    step_version: str

    def identity(self) -> object:
        """What a re-run operation must name the same, besides its class and coordinates
        (a state key, a checkpoint id...), for the replay to match it; None if nothing."""
        return None
