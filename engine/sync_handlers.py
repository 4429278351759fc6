"""Plain ``def`` handlers: run in a worker thread, with the same context operations.

A step registered with a plain ``def handler(ctx, ...)`` runs in a worker thread of anyio's
pool, so blocking code (a database driver, ``requests``, a CPU-bound loop) never stalls the
event loop, the lease renewals or the other executions. Its context is a
:class:`SyncStepContext`: every operation of :class:`~stepsource.engine.context.StepContext`,
called without ``await``. Each call goes back to the event loop and is served there, one at a
time, by one task that runs for the handler's run: the operations are recorded, matched on
replay and committed exactly as an ``async def`` handler's are (the recorder sees one task,
as for a handler body). A ``ctx.do`` body of a plain handler runs as any body does; it must
not call the context itself.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stepsource.aggregates.values import with_article
from stepsource.engine.context import StepContext
from stepsource.engine.failures import Unwinding
from stepsource.engine.sagas import Saga
from stepsource.errors import UsageError

__all__ = ["SyncSaga", "SyncStepContext", "run_sync_handler"]


#: plain (not awaited) context calls that record an operation
_RECORDING_CALLS = frozenset({"add_history_entry"})


async def _on_loop(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return call(*args, **kwargs)


_Request = tuple[
    Callable[..., Awaitable[Any]],
    tuple[Any, ...],
    dict[str, Any],
    MemoryObjectSendStream[tuple[Any, BaseException | None]],
]


class SyncStepContext:
    """The context of a plain ``def`` handler: a StepContext whose operations are called
    without ``await`` (``ctx.set_state("k", 1)``, ``ctx.do("charge", fn)``...); attributes
    and plain calls (``ctx.info``, ``ctx.history``, ``ctx.add_history_entry``) as they are;
    ``ctx.saga(name)`` is a :class:`SyncSaga`, used with ``with``."""

    def __init__(self, ctx: StepContext, submit: Callable[..., Any]) -> None:
        self._ctx = ctx
        self._submit = submit

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._ctx, name)
        if inspect.iscoroutinefunction(attribute):
            return functools.partial(self._submit, attribute)
        if name in _RECORDING_CALLS:  # plain calls that record: on the loop too
            return functools.partial(self._submit, _on_loop, attribute)
        return attribute

    def saga(self, name: str = "saga") -> SyncSaga:
        """:meth:`StepContext.saga` for a plain handler: ``with ctx.saga("order") as saga:``
        and ``saga.step(name, action, compensate=undo)`` without ``await``."""
        return SyncSaga(self._submit(_on_loop, self._ctx.saga, name), self._submit)

    def __repr__(self) -> str:
        return f"SyncStepContext({self._ctx.execution_id!r})"


class SyncSaga:
    """A :class:`~stepsource.engine.sagas.Saga` driven from a plain handler's thread: each
    action and compensation is served on the event loop like any context call."""

    def __init__(self, saga: Saga, submit: Callable[..., Any]) -> None:
        self._saga = saga
        self._submit = submit

    @property
    def name(self) -> str:
        return self._saga.name

    @property
    def compensated(self) -> list[str]:
        return self._saga.compensated

    @property
    def failed(self) -> dict[str, str]:
        return self._saga.failed

    def step(
        self,
        name: str,
        action: Callable[[], Any],
        *,
        compensate: Callable[[Any], Any] | None = None,
    ) -> Any:
        return self._submit(self._saga.step, name, action, compensate=compensate)

    def compensate(self, trigger: BaseException | None = None) -> None:
        self._submit(self._saga.compensate, trigger)

    def __enter__(self) -> SyncSaga:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._submit(self._saga.__aexit__, exc_type, exc, tb)


async def _serve(requests: MemoryObjectReceiveStream[_Request]) -> None:
    async with requests:
        async for operation, args, kwargs, reply in requests:
            async with reply:
                try:
                    value = await operation(*args, **kwargs)
                except (Exception, Unwinding) as error:  # noqa: BLE001 - raised in the thread, to unwind it
                    await reply.send((None, error))
                else:
                    await reply.send((value, None))


async def run_sync_handler(
    handler: Callable[..., Any], ctx: StepContext, kwargs: dict[str, Any]
) -> Any:
    """Run ``handler(SyncStepContext, **kwargs)`` in a worker thread; its context calls are
    served on this event loop by one task."""
    send, receive = anyio.create_memory_object_stream[_Request]()

    async def call(operation: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        reply_send, reply_receive = anyio.create_memory_object_stream[
            tuple[Any, BaseException | None]
        ](1)
        async with reply_receive:
            await send.send((operation, args, kw, reply_send))
            value, error = await reply_receive.receive()
        if error is not None:
            raise error
        return value

    handler_thread: list[int] = []

    def submit(operation: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        if threading.get_ident() not in handler_thread:
            raise UsageError(
                "a plain def handler's context was called from another thread than the "
                "handler's (a thread it started, or a ctx.do body)",
                hint="Call ctx from the handler itself; hand what other threads find back to it "
                "(a queue, a future), and keep ctx.do bodies free of context calls",
                **ctx.recorder.where(),
            )
        return anyio.from_thread.run(functools.partial(call, operation, *args, **kw))

    def in_thread() -> Any:
        handler_thread.append(threading.get_ident())
        returned = handler(SyncStepContext(ctx, submit), **kwargs)
        if inspect.isawaitable(returned):
            if inspect.iscoroutine(returned):
                returned.close()  # never awaited: closed, so Python does not warn about it
            raise UsageError(
                f"the plain def handler returned {with_article(type(returned).__name__)} "
                "instead of its result",
                hint="Declare it async def to await inside it, or return the value itself",
                **ctx.recorder.where(),
            )
        return returned

    outcome: BaseException | None = None
    result: Any = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve, receive)
        try:
            result = await anyio.to_thread.run_sync(in_thread, abandon_on_cancel=True)
        except BaseException as error:  # noqa: BLE001 - raised below, outside the group
            outcome = error
        finally:
            send.close()
    ctx.recorder.hand_back_scopes()
    if outcome is not None:
        raise outcome
    return result
