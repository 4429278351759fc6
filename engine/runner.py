"""The one handler runner: every run of a handler, live or replayed, goes through here.

A live attempt, a resumed one (the actor, :mod:`.actor`), a verify replay (:mod:`.verify`)
and a query's read-only replay (:mod:`.querying`) all call :func:`run_handler` with a
:class:`~stepsource.engine.recorder.Recorder` whose replay cursor sets the mode (live
recording, or read-only against the log). The runner validates the input, applies the step's
timeout and catches what the handler raised, in one place: each caller only interprets the
:class:`HandlerRun` it gets back. Exception groups from task groups inside the handler are
unwrapped to the engine's own control flow they carry (a suspension, a cancellation, the end
of a read-only replay, a divergence, a lost lease, an outage); a cancellation of the caller
itself propagates.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from stepsource.engine.context import StepContext
from stepsource.engine.failures import Unwinding, users_own
from stepsource.engine.recorder import HistoryNeeded, Recorder
from stepsource.engine.replay import ReplayEnd
from stepsource.engine.sync_handlers import run_sync_handler
from stepsource.engine.waiting import Cancelled, Suspended, deliver_at_end
from stepsource.errors import BackendUnavailableError, NonDeterminismError, VersionConflictError

__all__ = ["UNWINDING", "HandlerRun", "find", "run_handler"]

_E = TypeVar("_E", bound=BaseException)

#: the engine's control flow, found inside a handler's exception groups and raised bare
UNWINDING: tuple[type[BaseException], ...] = (
    HistoryNeeded,
    Suspended,
    Cancelled,
    ReplayEnd,
    NonDeterminismError,
    VersionConflictError,
    BackendUnavailableError,
)


@dataclass(frozen=True, slots=True)
class HandlerRun:
    """How one run of a handler ended: it returned ``output``, or raised ``error``."""

    ctx: StepContext
    output: Any = None
    error: BaseException | None = None


def find(error: BaseException, kind: type[_E] | tuple[type[_E], ...]) -> _E | None:
    """``error`` itself or the first ``kind`` inside (nested) exception groups."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = find(inner, kind)
            if found is not None:
                return found
    return None


async def run_handler(recorder: Recorder) -> HandlerRun:
    """Run the recorder's handler once from the top, with its input and timeout."""
    definition = recorder.definition
    ctx = StepContext(recorder)
    if recorder.unfit is not None:  # refused before it ran: the attempt fails with it
        return HandlerRun(ctx, error=recorder.unfit)
    try:
        try:
            kwargs = definition.input_kwargs(
                recorder.aggregate.input, execution_id=recorder.execution_id, stored=True
            )
            timeout = definition.timeout
            timed = timeout is not None  # no scope to enter without a timeout
            began = anyio.current_time()
            with anyio.move_on_after(timeout) if timed else contextlib.nullcontext() as scope:
                if definition.sync:
                    output = await run_sync_handler(definition.handler, ctx, kwargs)
                else:
                    output = await definition.handler(ctx, **kwargs)
                await deliver_at_end(recorder)
            if scope is not None and scope.cancelled_caught:
                raise TimeoutError(
                    f"the handler ran past the step's timeout of {timeout:g} s "
                    "(@engine.step(timeout=...)) and was cancelled at an await"
                )
            if timeout is not None and anyio.current_time() - began > timeout:
                # it never yielded to be stopped (it blocked the loop, or caught the
                # cancellation): over its timeout all the same, its output is not kept
                raise TimeoutError(
                    f"the handler ran past its timeout of {timeout:g} s without letting it "
                    "stop the handler (it blocked the event loop or caught the cancellation)"
                )
        except BaseExceptionGroup as group:
            found = find(group, UNWINDING)
            if found is not None:
                raise found from None
            raise  # an ExceptionGroup is the handler's own failure; a cancellation goes on
    except Unwinding as unwound:  # a suspension, a cancelled execution, a replay's end...
        return HandlerRun(ctx, error=unwound)
    except Exception as error:  # noqa: BLE001 - the one error boundary of a handler run
        return HandlerRun(ctx, error=error)
    except BaseException as error:
        if not users_own(error):  # a cancellation, Ctrl-C: they go on
            raise
        return HandlerRun(ctx, error=error)  # SystemExit, a CancelledError of its own...
    return HandlerRun(ctx, output=output)
