"""Where a ``ctx.do`` body runs: a sync body in one of the worker's body threads.

A sync (``def``) body may block: a database driver, ``time.sleep``, a CPU-bound loop. Run on
the event loop it would stop everything else there, lease renewals included, so a body
longer than the lease would lose its lease and run again on another worker. It runs in a
thread of :class:`BodyThreads` instead: at most :data:`BODY_THREADS` at once per worker (a
body submitted while all are busy waits for a free one), with the handler's context
variables. An ``async def`` body runs on the event loop as before; a sync callable that
returns an awaitable (``lambda: client.fetch(url)``) has it awaited on the event loop.

The pool is the worker's own rather than ``anyio.to_thread``'s: a sequential handler's
``ctx.do`` pays one hand-off to a waiting thread and one wake-up back
(:mod:`stepsource.adapters.handoff`), without a checkpoint, a limiter and a cancel scope per
call, which cost as much as the hand-off itself on a 2-core machine. Threads start on demand
and end after :data:`IDLE_SECONDS` without work.

When the body is the only one in flight and its execution the only one the worker runs
(``alone``), the event loop's thread waits for it in place for up to
:data:`INLINE_WAIT_SECONDS` before it goes back to the loop: nothing else of this worker needs
the loop then, and a short body's result is taken without the loop's wake-up (about a fifth of
a sequential ``ctx.do`` on SQLite). A longer body stalls the loop that long once, then is
awaited as usual; with other executions or other bodies running it is always awaited. A body
waited for in place runs on the core the loop's thread runs on (Linux,
:mod:`stepsource.engine.affinity`): the hand-over and the wake-up back are then switches on one
core, not wake-ups of the other; the next body not waited for in place runs on any core again.

A thread cannot be interrupted: a cancellation (the step's timeout, a lost lease, shutdown)
takes effect when the body returns, and its result is then not recorded.
"""

from __future__ import annotations

import contextvars
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio.lowlevel

from stepsource.adapters.handoff import Handoff, loop_waker
from stepsource.engine.affinity import Pin, current_cpu

__all__ = ["BODY_THREADS", "IDLE_SECONDS", "INLINE_WAIT_SECONDS", "BodyThreads", "run_body"]

#: sync bodies running at once in one worker (one runtime)
BODY_THREADS = 32
#: a body thread without work for this long ends (the next body starts a new one)
IDLE_SECONDS = 10.0
#: how long the event loop's thread waits in place for a body that runs alone (seconds)
INLINE_WAIT_SECONDS = 0.0003

#: a job: the caller's context, the body, its outcome, and the core to run it on (None: any)
_Job = tuple[contextvars.Context, Callable[[], Any], Handoff, int | None]


class BodyThreads:
    """Up to ``size`` threads serving sync bodies from one queue, in submission order."""

    @property
    def threads(self) -> int:
        """Threads alive now (busy or waiting for work)."""
        return self._threads

    def __init__(self, size: int = BODY_THREADS, idle_seconds: float = IDLE_SECONDS) -> None:
        self.size = size
        self.idle_seconds = idle_seconds
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # alive
        self._unfinished = 0  # submitted and not finished

    async def run(self, fn: Callable[[], Any], *, alone: bool = False) -> Any:
        """``fn()`` in a body thread, with the caller's context variables. ``alone``: the
        caller's execution is the only one running here, so if no other body is in flight
        the loop's thread waits for this one in place for a moment (module docstring)."""
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled already: run nothing
        outcome = Handoff(loop_waker())
        with self._lock:
            self._unfinished += 1
            in_place = alone and self._unfinished == 1
            core = current_cpu() if in_place else None  # the loop's: it waits there
            self._jobs.put((contextvars.copy_context(), fn, outcome, core))
            if self._unfinished > self._threads and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._serve, name="stepsource-body", daemon=True).start()
        return await outcome.outcome(INLINE_WAIT_SECONDS if in_place else 0.0)

    def _serve(self) -> None:
        pin = Pin()
        while True:
            try:
                context, fn, outcome, core = self._jobs.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:  # a job put meanwhile keeps this thread
                    if self._jobs.empty():
                        self._threads -= 1
                        return
                continue
            pin.to(core)
            outcome.run(lambda: context.run(fn))  # noqa: B023 - called before the next job
            with self._lock:
                self._unfinished -= 1
            outcome.done()
            del context, fn, outcome  # hold nothing of the execution while idle


async def run_body(fn: Callable[[], Any], threads: BodyThreads, *, alone: bool = False) -> Any:
    """Run ``fn``: on the event loop if it is a coroutine function, else in a body thread
    (``alone``: see :meth:`BodyThreads.run`)."""
    if inspect.iscoroutinefunction(fn):
        return await fn()
    result = await threads.run(fn, alone=alone)
    if inspect.isawaitable(result):
        result = await result
    return result
