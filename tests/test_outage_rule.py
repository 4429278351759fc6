"""The rule that tells a lease lost in a backend outage from a dead worker (engine/outages.py),
on the aggregate alone: what a takeover records, and that a replay folds the same count."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.clock import to_ms
from stepsource.engine.outages import ContactLog, excuse_outage, last_event_ms
from stepsource.engine.watchdog import watch_event_loop
from stepsource.projections.folds import replay

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def started(at: datetime = T0) -> StepExecution:
    aggregate = StepExecution.schedule(
        execution_id=uuid.uuid4(),
        timestamp=at,
        step_id="s",
        step_version="1",
        definition={},
        input={},
        config={},
    )
    aggregate.lease(timestamp=at, worker_id="w0", executor="e", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=at, worker_id="w0", step_version="1")
    return aggregate


def take_over(aggregate: StepExecution, contact: ContactLog, at: datetime) -> bool:
    """What a worker taking the lease does (engine/leasing.py): StepLeased, then the rule."""
    since = last_event_ms(aggregate)
    aggregate.lease(timestamp=at, worker_id="w", executor="e", lease_expires_ms=0)
    return excuse_outage(contact, aggregate, "w", since)


def test_an_outage_before_the_holders_last_event_excuses_nothing() -> None:
    aggregate = started()
    contact = ContactLog()
    contact.failed(to_ms(T0) - 1)  # the holder recorded its lease after: it survived that
    assert not take_over(aggregate, contact, T0 + timedelta(seconds=5))
    assert aggregate.leases_lost == 1


def test_an_outage_after_the_holders_last_event_excuses_the_takeover() -> None:
    aggregate = started()
    contact = ContactLog()
    contact.failed(to_ms(T0) + 2000)
    contact.failed(to_ms(T0) + 1000)  # an older failure reported late changes nothing
    assert contact.last_failed_ms == to_ms(T0) + 2000
    assert take_over(aggregate, contact, T0 + timedelta(seconds=5))
    assert aggregate.leases_lost == 0
    outage = aggregate.pending_events[-1]
    assert isinstance(outage, ev.BackendOutage)
    assert (outage.since_ms, outage.unreachable_ms, outage.attempt) == (
        to_ms(T0),
        to_ms(T0) + 2000,
        1,
    )


# a takeover's second: the worker failed to reach the backend at that offset (None: never)
_takeovers = st.lists(
    st.tuples(st.booleans(), st.none() | st.integers(-3000, 3000)), min_size=1, max_size=12
)


@given(_takeovers)
def test_only_takeovers_without_an_outage_count_and_a_replay_agrees(
    steps: list[tuple[bool, int | None]],
) -> None:
    """Whatever the mix of progress, excused and counted takeovers, ``leases_lost`` is the
    number of takeovers since the last progress that no outage excused, live and replayed."""
    aggregate = started()
    counted = 0
    for n, (progress, failed_at) in enumerate(steps):
        at = T0 + timedelta(seconds=10 * (n + 1))
        if progress:
            aggregate.set_state("k", n, timestamp=at, op=(1, "", n, "1"))
            counted = 0
        contact = ContactLog()
        if failed_at is not None:
            contact.failed(last_event_ms(aggregate) + failed_at)
        excused = take_over(aggregate, contact, at + timedelta(seconds=5))
        assert excused == (failed_at is not None and failed_at >= 0)
        counted += 0 if excused else 1
        assert aggregate.leases_lost == counted
    folded = replay(aggregate.collect_events())
    assert folded is not None
    assert folded.leases_lost == counted


def test_a_call_that_took_a_renewal_interval_counts_as_unreachable_except_the_first() -> None:
    contact = ContactLog()
    contact.answered(0.0, 5.0, 1.0, 1000)  # the first call connects: slow for that alone
    assert contact.last_failed_ms is None
    contact.answered(10.0, 10.01, 1.0, 2000)
    assert contact.last_failed_ms is None
    contact.answered(20.0, 21.0, 1.0, 3000)  # leases could lapse while it waited
    assert contact.last_failed_ms == 3000


def test_a_call_slow_because_the_workers_own_loop_was_stuck_says_nothing() -> None:
    contact = ContactLog()
    contact.answered(0.0, 0.01, 1.0, 1000)
    contact.stalled(30.5)  # the watchdog saw the loop stuck while the call was out
    contact.answered(30.0, 32.0, 1.0, 2000)
    assert contact.last_failed_ms is None
    contact.answered(40.0, 42.0, 1.0, 3000)  # a later slow call, the loop running
    assert contact.last_failed_ms == 3000


@pytest.mark.anyio
async def test_the_watchdog_tells_the_contact_log_while_the_loop_is_stuck() -> None:
    contact = ContactLog()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_event_loop, 600, list, contact.stalled)  # heartbeats every 0.1 s
        await anyio.sleep(0.3)
        began = time.monotonic()
        # block the loop until the watchdog says so (a loaded machine may delay its thread
        # past any fixed time; it may also have seen the loop late before ``began``)
        while contact.last_stall < began:
            assert time.monotonic() < began + 30, "the watchdog never told the contact log"
            time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
        told = contact.last_stall  # read before the loop runs again
        ended = time.monotonic()
        tg.cancel_scope.cancel()
    assert began <= told <= ended  # told while the loop was stuck
