"""Where a ``ctx.do`` body runs: a sync body in a worker thread, off the event loop.

A sync (``def``) body may block: a database driver, ``time.sleep``, a CPU-bound loop. Run on
the event loop it would stop everything else there, lease renewals included, so a body
longer than the lease would lose its lease and run again on another worker. It runs in a
worker thread instead (``anyio.to_thread.run_sync``), at most :data:`BODY_THREADS` at once
per worker (a ``CapacityLimiter``; more wait for a free thread), with the handler's context
variables. An ``async def`` body runs on the event loop as before; a sync callable that
returns an awaitable (``lambda: client.fetch(url)``) has it awaited on the event loop.

A thread cannot be interrupted: a cancellation (the step's timeout, a lost lease, shutdown)
takes effect when the body returns, and its result is then not recorded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from stepsource.engine.runtime import Runtime

__all__ = ["BODY_THREADS", "run_body"]

#: sync bodies running at once in one worker (one runtime)
BODY_THREADS = 32


async def run_body(fn: Callable[[], Any], runtime: Runtime) -> Any:
    """Run ``fn``: on the event loop if it is a coroutine function, else in a thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn()
    if runtime.body_threads is None:
        runtime.body_threads = anyio.CapacityLimiter(BODY_THREADS)
    # boxed: trio refuses a thread function that returns a coroutine
    (result,) = await anyio.to_thread.run_sync(lambda: (fn(),), limiter=runtime.body_threads)
    if inspect.isawaitable(result):
        result = await result
    return result
