"""Handing a thread's result to a task in an event loop (:mod:`stepsource.adapters.handoff`).

The waiter may first wait in its own thread for a moment (``within``) and then sleep on the
event loop; the thread wakes the loop only when the waiter sleeps there. However the job's
end falls against that wait (before it, during it, after it, while the waiter switches to
sleeping), the waiter gets the job's result or exception, never hangs, and the loop is woken
at most once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepsource.adapters.handoff import Handoff, loop_waker


async def _hand_over(delay: float, within: float, fails: bool) -> tuple[object, int]:
    wakes = 0
    waker = loop_waker()

    def counting(callback: Callable[[], object]) -> object:
        nonlocal wakes
        wakes += 1
        return waker(callback)

    handoff = Handoff(counting)

    def job() -> int:
        time.sleep(delay)
        if fails:
            raise KeyError("lost")
        return 42

    def serve() -> None:
        handoff.run(job)
        handoff.done()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with anyio.fail_after(10):
            result: object = await handoff.outcome(within)
    except KeyError as exc:
        result = exc
    thread.join()
    return result, wakes


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None)
@given(
    delay=st.sampled_from([0.0, 0.0001, 0.0003, 0.001, 0.003]),
    within=st.sampled_from([0.0, 0.0002, 0.001, 0.01]),
    fails=st.booleans(),
)
def test_the_waiter_always_gets_the_jobs_outcome_and_the_loop_is_woken_at_most_once(
    delay: float, within: float, fails: bool, loop: str
) -> None:
    result, wakes = anyio.run(_hand_over, delay, within, fails, backend=loop)
    if fails:
        assert isinstance(result, KeyError)
    else:
        assert result == 42
    assert wakes <= 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("delay", "within", "wakes_expected"),
    [
        (0.0, 5.0, 0),  # done within the wait: taken in place, the loop is never woken
        (0.05, 0.0, 1),  # no wait in place: the thread wakes the sleeping waiter
    ],
)
async def test_the_thread_wakes_the_loop_only_for_a_waiter_asleep_on_it(
    delay: float, within: float, wakes_expected: int, anyio_backend: str
) -> None:
    result, wakes = await _hand_over(delay, within, fails=False)
    assert (result, wakes) == (42, wakes_expected)
