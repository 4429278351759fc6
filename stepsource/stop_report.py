"""Saying what a stop waits for: a handler or ``ctx.do`` body running in a thread cannot be
interrupted, so an engine closing (``stepsource worker`` on SIGTERM, the end of
``ss.lifespan``) waits for it to return; meanwhile the host says, every
:data:`STOP_REPORT_SECONDS`, which executions it waits for."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

__all__ = ["STOP_REPORT_SECONDS", "executions_text", "report_stop"]

#: while a stop waits for handlers or bodies that have not returned, it says which this often
STOP_REPORT_SECONDS = 5.0


def executions_text(ids: list[str]) -> str:
    """``ids`` for a log line: the first five and how many more."""
    if not ids:
        return "no running executions"
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return f"execution{'s' if len(ids) > 1 else ''} {shown}"


async def report_stop(live: Callable[[], list[str]], logger: logging.Logger, then: str) -> None:
    """Every :data:`STOP_REPORT_SECONDS`, while ``live()`` names executions, log that the
    stop still waits for them (``then``: what the reader may do about it); until cancelled."""
    while True:
        await anyio.sleep(STOP_REPORT_SECONDS)
        running = live()
        if running:
            logger.warning(
                "still stopping: waiting for the handler or ctx.do body of %s to return (a "
                "thread cannot be interrupted); %s",
                executions_text(running),
                then,
            )
