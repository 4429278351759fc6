"""What counts as a failure of user code, and messages a worker can always record of it.

:func:`users_own` decides, at the boundary of a handler run and of a ``ctx.do`` body, whether
an exception is that code's failure (recorded as the attempt's or the body's) or something
that must go on unwinding: the engine's own control flow (:class:`Unwinding`), a
cancellation in effect, Ctrl-C, a coroutine being closed. Every other exception is the
code's own, ``SystemExit`` (``sys.exit()``, argparse) included: nothing one execution raises
stops the worker.

An exception's message is the user's text: it may be megabytes long, or hold a lone
surrogate that no encoder accepts. What the actor records of it (AttemptFailed, StepFailed)
goes through :func:`failure_message`, so recording a failure never fails in its turn.
"""

from __future__ import annotations

import asyncio
import traceback

import anyio

from stepsource.errors import StepsourceError

__all__ = ["MAX_MESSAGE_BYTES", "Unwinding", "bounded_text", "failure_message", "users_own"]

#: a recorded failure message is cut to this many bytes of UTF-8 (or less, under a smaller
#: payload limit)
MAX_MESSAGE_BYTES = 16 * 1024

_CUT = " ... [cut: {} more bytes]"


class Unwinding(BaseException):
    """The engine's own control flow through user code (a suspension, a cancelled execution,
    the end of a read-only replay, a run again with every event): never the failure of the
    code it passes through."""


def users_own(error: BaseException) -> bool:
    """Whether ``error``, raised out of a handler or a ``ctx.do`` body, is that code's own
    failure. Not so: the engine's control flow, ``KeyboardInterrupt`` (how Ctrl-C arrives,
    wherever the main thread is: the worker stops), ``GeneratorExit`` (Python closing the
    coroutine: catching it would keep a closed coroutine running), a cancellation in effect
    (a step's timeout, a lost lease, a shutdown) and a group holding any of them. A
    ``CancelledError`` the code raised itself, with no cancellation of its task under way,
    is its own (asyncio counts the cancellations requested of a task; trio's cannot be
    raised by hand)."""
    if isinstance(error, Exception):
        return True
    if isinstance(error, Unwinding | KeyboardInterrupt | GeneratorExit):
        return False
    if isinstance(error, BaseExceptionGroup):
        return all(users_own(inner) for inner in error.exceptions)
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(error, cancelled):
        if cancelled is not asyncio.CancelledError:
            return False
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0
    return True


def bounded_text(text: str, max_bytes: int) -> str:
    """``text`` as valid UTF-8 text (lone surrogates replaced) of at most about ``max_bytes``
    bytes; a cut says how much was left out."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return kept + _CUT.format(len(data) - len(kept.encode("utf-8")))


def failure_message(
    error: BaseException, max_payload_bytes: int, execution_id: str | None = None
) -> str:
    """The recorded message of ``error``: its type and text, bounded and valid.

    ``execution_id``: the execution the message is recorded for (or logged about). A
    :class:`~stepsource.errors.StepsourceError` about that execution is recorded without
    naming it and its step again (whoever reads the record knows where it is, and a
    StepFailedError raised from it adds them once); one about another execution, or about
    none (a step id alone may name another step), keeps them.
    """
    try:
        if (
            execution_id is not None
            and isinstance(error, StepsourceError)
            and error.execution_id == execution_id
        ):
            kind = type(error)
            lines = [f"{kind.__module__}.{kind.__qualname__}: {error.describe(where=False)}"]
            lines += [str(note) for note in getattr(error, "__notes__", ())]
            text = "\n".join(lines).strip()
        else:
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
    except Exception:  # noqa: BLE001 - a __str__ that raises still gets a message
        text = f"{type(error).__name__} (its message could not be read)"
    return bounded_text(text, max(64, min(MAX_MESSAGE_BYTES, max_payload_bytes // 4)))
