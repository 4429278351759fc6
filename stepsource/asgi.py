"""Running engines for the lifetime of an ASGI application (FastAPI, Starlette, ...).

``lifespan(engine, ...)`` returns what the ``lifespan=`` argument of FastAPI and Starlette
takes: on startup every engine opens its backend and starts its workers (``async with
engine``); on shutdown they stop leasing, cancel in-flight handlers (which resume elsewhere
by replay), release their leases and close. The engines are also put in the lifespan state,
so a request handler can read ``request.state.engine`` (the first engine) or
``request.state.engines``::

    engine = ss.Engine()

    app = FastAPI(lifespan=ss.lifespan(engine))

Nothing here imports Starlette: the helper follows the ASGI lifespan protocol as those
frameworks expose it (a callable taking the app and returning an async context manager).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from stepsource.engine.engine import Engine
from stepsource.errors import UsageError

__all__ = ["lifespan"]

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
        async with AsyncExitStack() as stack:
            for engine in engines:
                await stack.enter_async_context(engine)
            yield {"engine": engines[0], "engines": engines}

    return run
