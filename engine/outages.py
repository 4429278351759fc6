"""Telling a lease lost in a backend outage from a dead worker, for the lost-worker cutoff.

A worker taking the lease of an execution whose attempt another worker left running (a
*takeover*) cannot see whether that worker died or was only cut off from the backend: both
stop renewing, and the lease lapses. Only a dead worker should count toward the cutoff
(``MAX_LOST_WORKERS`` takeovers in a row with no progress fail the execution), so each worker
keeps a :class:`ContactLog`, the last moment a call of its own to the backend failed
(``BackendUnavailableError`` while leasing, renewing or committing, or a lease or renewal
call that took a whole renewal interval to answer while the worker's own event loop kept
running), and the rule is:

    A takeover is excused when the worker taking it failed to reach the backend itself at
    or after the previous holder's last recorded event (its last progress, or its own
    StepLeased if it recorded nothing since).

A holder that stops while the backend answers everyone is dead (or partitioned on its own,
which is the same to the execution); one whose stop coincides with an outage the new holder
saw too may have been alive. The decision is recorded, not recomputed: the new holder
appends :class:`~stepsource.aggregates.events.BackendOutage` right after its StepLeased, in
the same commit, and that event takes the takeover's count back. A replay folds the same
events to the same count on every machine, whatever each worker saw.

What the rule cannot tell: a worker that really died during (or just before) an outage the
new holder saw is excused too, so each outage can add one takeover to a real crash loop
before the cutoff stops it; a holder alone in a partition while the rest reach the backend
counts as lost. Times are the workers' clocks (epoch ms), as leases already assume.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution

__all__ = ["ContactLog", "excuse_outage"]


@dataclass
class ContactLog:
    """When this worker last failed to reach its backend (epoch ms; None: never)."""

    last_failed_ms: int | None = None
    #: whether a call answered yet (the first one connects, and may be slow for that alone)
    answered_once: bool = False
    #: when the event-loop watchdog last saw this worker's loop stuck (``time.monotonic``)
    last_stall: float = float("-inf")

    def failed(self, now_ms: int) -> None:
        """Note a call to the backend that failed as unavailable at ``now_ms``."""
        if self.last_failed_ms is None or now_ms > self.last_failed_ms:
            self.last_failed_ms = now_ms

    def stalled(self, at: float) -> None:
        """Note that the worker's own event loop was stuck at ``at`` (from the watchdog's
        thread): a call that was slow meanwhile says nothing about the backend."""
        self.last_stall = at

    def answered(self, began: float, ended: float, bound: float, now_ms: int) -> None:
        """Note a lease or renewal call that ran from ``began`` to ``ended``
        (``time.monotonic``). One that took ``bound`` (a renewal interval) or longer counts
        as a failure to reach the backend until ``now_ms``: a backend that rides out an
        outage inside the call (NATS retries until its operation timeout, SQLite waits out
        another process's lock) leaves leases to lapse meanwhile just as one that fails.
        Not the first call of a worker (it connects), nor one during which the worker's own
        event loop was stuck (blocking code, not the backend)."""
        if self.answered_once and ended - began >= bound and self.last_stall < began:
            self.failed(now_ms)
        self.answered_once = True


def excuse_outage(
    contact: ContactLog, aggregate: StepExecution, worker_id: str, since_ms: int
) -> bool:
    """After a takeover's StepLeased (not yet committed) on ``aggregate``: record a
    BackendOutage if this worker failed to reach the backend at or after ``since_ms``, the
    time of the stream's last event before the StepLeased. Returns whether it did."""
    failed = contact.last_failed_ms
    if failed is None or failed < since_ms:
        return False
    aggregate.trigger_event(
        ev.BackendOutage,
        timestamp=aggregate.modified_on,
        worker_id=worker_id,
        attempt=aggregate.attempt,
        since_ms=since_ms,
        unreachable_ms=failed,
    )
    return True


def last_event_ms(aggregate: StepExecution) -> int:
    """The time of the aggregate's last event (epoch ms): read before a StepLeased."""
    return int(aggregate.modified_on.timestamp() * 1000)  # as clock.to_ms
