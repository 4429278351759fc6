"""Running engines for the lifetime of an ASGI application (FastAPI, Starlette, ...).

``lifespan(engine, ...)`` returns what the ``lifespan=`` argument of FastAPI and Starlette
takes: on startup every engine opens its backend and starts its workers (``async with
engine``); on shutdown they stop leasing, cancel in-flight handlers (which resume elsewhere
by replay), release their leases and close; while a handler or ``ctx.do`` body running in a
thread holds the close up, a warning names its executions every few seconds. The engines
are also put in the lifespan state, so a request handler can read ``request.state.engine``
(the first engine) or ``request.state.engines``::

    engine = ss.Engine()

    app = FastAPI(lifespan=ss.lifespan(engine))

Nothing here imports Starlette: the helper follows the ASGI lifespan protocol as those
frameworks expose it (a callable taking the app and returning an async context manager).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio

from stepsource.engine.engine import Engine
from stepsource.errors import UsageError
from stepsource.stop_report import report_stop

__all__ = ["lifespan"]

_logger = logging.getLogger("stepsource.worker")
#: what a service's operator may do while a stop waits for a thread body
_THEN = (
    "the server waits for the application's shutdown: your process manager's kill timeout "
    "ends it (the executions resume elsewhere once their leases lapse)"
)

Lifespan = Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]


def lifespan(*engines: Engine) -> Lifespan:
    """A lifespan that runs ``engines`` (workers included) while the application runs."""
    if not engines or not all(isinstance(e, Engine) for e in engines):
        raise UsageError(
            "lifespan() takes one or more stepsource Engines",
            hint="For example: FastAPI(lifespan=ss.lifespan(engine))",
        )

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[dict[str, Any]]:
        # a thread body holding the close up is named every few seconds (a service hung on
        # deploy says why): the reporter's task group encloses the engines, whose own task
        # groups are entered and left by this task
        async with anyio.create_task_group() as saying:
            try:
                async with AsyncExitStack() as stack:
                    for engine in engines:
                        await stack.enter_async_context(engine)
                    try:
                        yield {"engine": engines[0], "engines": engines}
                    finally:
                        saying.start_soon(report_stop, lambda: _live(engines), _logger, _THEN)
            finally:
                saying.cancel_scope.cancel()

    return run


def _live(engines: tuple[Engine, ...]) -> list[str]:
    return [eid for engine in engines for eid in engine.live_executions()]
