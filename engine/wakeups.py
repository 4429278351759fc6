"""Wake-ups from other processes: the backend's push channel feeds the engine's notifiers.

:meth:`~stepsource.adapters.ports.Backend.watch` calls back whenever another process may
have queued work or changed an execution (PostgreSQL: ``LISTEN/NOTIFY``); each call wakes
this engine's workers (to lease) and its waiting handles (to read). Backends without such a
channel return at once, and the engine sees other processes by polling, as it always does.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepsource.adapters.ports import Backend
from stepsource.engine.notify import Notifier

__all__ = ["follow_wakeups"]


async def follow_wakeups(backend: Backend, notifiers: Sequence[Notifier]) -> None:
    """Run the backend's watch until cancelled, waking every notifier on each call."""

    def wake() -> None:
        for notifier in notifiers:
            notifier.notify()

    await backend.watch(wake)
