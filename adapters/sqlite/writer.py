"""The SQLite backend's writer thread: one long-lived thread that runs every write in order.

A group commit hands its whole batch to this thread and waits for one wake-up, instead of
borrowing a pooled worker thread per batch (``anyio.to_thread.run_sync`` costs a limiter, a
context copy and a cancel-scope check on every call: about a third of a 1-row commit's time).
The thread holds no reference to the backend between jobs; it stops when the backend is
closed or garbage collected, and a later write starts a new one.

Results travel back through the event loop's own thread-safe entry point
(:mod:`stepsource.adapters.handoff`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar, cast

import anyio

from stepsource.adapters.handoff import Handoff, Waker

__all__ = ["WriterThread"]

T = TypeVar("T")

_Job = tuple[Callable[[], object], Handoff]


def _serve(jobs: queue.SimpleQueue[_Job | None], queued: list[int], lock: threading.Lock) -> None:
    while (job := jobs.get()) is not None:
        body, outcome = job
        outcome.run(body)
        with lock:
            queued[0] -= 1
        outcome.done()
        del job, body, outcome  # hold nothing of the backend while idle


class WriterThread:
    """Runs callables one at a time, in submission order, on one dedicated thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        #: jobs handed over and not finished yet (one cell, shared with the thread)
        self._queued = [0]
        self._count_lock = threading.Lock()

    @property
    def idle(self) -> bool:
        """No job is queued or running: a caller may run its write in its own thread
        instead (under the connection's lock), and nothing handed over earlier is passed."""
        return self._queued[0] == 0

    def _queue(self) -> queue.SimpleQueue[_Job | None]:
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(
                    target=_serve,
                    args=(self._jobs, self._queued, self._count_lock),
                    name=self._name,
                    daemon=True,
                ).start()
            return self._jobs

    async def run(self, body: Callable[[], T], waker: Waker, event: anyio.Event | None = None) -> T:
        """Run ``body`` on the thread and return its result (or raise its exception).

        The wait is shielded: a write that started always finishes before its caller sees
        a cancellation, as with ``anyio.to_thread.run_sync``. ``event`` (unset, set by
        nobody else) is the one to wait on, if the caller has one already.
        """
        outcome = Handoff(waker, event)
        jobs = self._queue()
        with self._count_lock:
            self._queued[0] += 1
        jobs.put((body, outcome))
        return cast(T, await outcome.outcome())

    def stop(self) -> None:
        """Let the thread finish its queued jobs and exit; the next job starts a new one."""
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.put(None)
