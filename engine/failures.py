"""Failure messages a worker can always record: bounded, and valid text.

An exception's message is the user's text: it may be megabytes long, or hold a lone
surrogate that no encoder accepts. What the actor records of it (AttemptFailed, StepFailed)
goes through :func:`failure_message`, so recording a failure never fails in its turn.
"""

from __future__ import annotations

import traceback

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


def failure_message(error: BaseException, max_payload_bytes: int) -> str:
    """The recorded message of ``error``: its type and text, bounded and valid."""
    try:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
    except Exception:  # noqa: BLE001 - a __str__ that raises still gets a message
        text = f"{type(error).__name__} (its message could not be read)"
    return bounded_text(text, max(64, min(MAX_MESSAGE_BYTES, max_payload_bytes // 4)))
