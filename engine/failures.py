"""Failure messages a worker can always record: bounded, and valid text.

An exception's message is the user's text: it may be megabytes long, or hold a lone
surrogate that no encoder accepts. What the actor records of it (AttemptFailed, StepFailed)
goes through :func:`failure_message`, so recording a failure never fails in its turn.
"""

from __future__ import annotations

import traceback

from stepsource.errors import StepsourceError

__all__ = ["MAX_MESSAGE_BYTES", "bounded_text", "failure_message"]

#: a recorded failure message is cut to this many bytes of UTF-8 (or less, under a smaller
#: payload limit)
MAX_MESSAGE_BYTES = 16 * 1024

_CUT = " ... [cut: {} more bytes]"


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
