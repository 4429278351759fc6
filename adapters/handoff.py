"""Handing a result from a plain thread to a task waiting in an event loop.

A thread that finished a job wakes its waiter through the loop's own thread-safe entry point
(asyncio's ``call_soon_threadsafe``, trio's ``run_sync_soon``), looked up once per loop by
:func:`loop_waker`; the waiter sleeps on an ``anyio.Event`` inside a shielded scope, so a job
that started always finishes before its caller sees a cancellation (as with
``anyio.to_thread.run_sync``, without its per-call checkpoint, limiter and cancel-scope
bookkeeping). Used by the SQLite writer thread and by the threads ``ctx.do`` bodies run in.

A waiter may first wait for a short time in its own thread (:meth:`Handoff.outcome`'s
``within``), blocking the event loop meanwhile: a job done by then costs one thread wake-up
each way and no pass of the event loop (the loop's wake-up through its self-pipe, the
callback and the task's resumption cost about as much as the job's hand-over itself). The
job's thread wakes the loop only if the waiter went to sleep on the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

import anyio

__all__ = ["Handoff", "Waker", "loop_waker"]

Waker = Callable[[Callable[[], object]], object]


class Handoff:
    """One job's result or exception, and the event its waiter sleeps on."""

    __slots__ = ("asleep", "error", "event", "result", "running", "waker")

    def __init__(self, waker: Waker, event: anyio.Event | None = None) -> None:
        self.event = anyio.Event() if event is None else event
        self.waker = waker
        self.result: object = None
        self.error: BaseException | None = None
        #: held until the job is done: the waiter's wait in its own thread
        self.running = threading.Lock()
        self.running.acquire()
        #: the waiter sleeps (or is about to) on :attr:`event`: the thread must wake it
        self.asleep = False

    def run(self, body: Callable[[], object]) -> None:
        """Run ``body`` here (in the thread) and keep its result or exception."""
        try:
            self.result = body()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, re-raised there
            self.error = exc

    def done(self) -> None:
        """Tell the waiter (from the thread); wake its event loop only if it sleeps there.

        The release comes before the read of :attr:`asleep`, and the waiter sets that before
        its last try of the lock: one of the two sides always sees the other."""
        self.running.release()
        if self.asleep:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                self.waker(self.event.set)

    async def outcome(self, within: float = 0.0) -> object:
        """Wait (shielded) until the thread is done; its result, or raise its exception.

        ``within`` (seconds): first wait that long in this thread, the event loop's (which
        does nothing else meanwhile), then sleep on the event loop if the job is not done."""
        if not (within > 0 and self.running.acquire(timeout=within)):
            self.asleep = True
            if not self.running.acquire(blocking=False):
                with anyio.CancelScope(shield=True):
                    await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.result


def loop_waker() -> Waker:
    """The running event loop's thread-safe "call this soon" function."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # no asyncio loop in this thread: trio runs this task
        import trio.lowlevel

        return trio.lowlevel.current_trio_token().run_sync_soon
