"""Broadcast wake-ups inside one process (new work queued, an execution changed).

Other processes are seen by polling the backend; these only cut the latency locally.
"""

from __future__ import annotations

import anyio

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        #: notifications so far: a waiter busy elsewhere when one came (nobody waits then, so
        #: nothing is woken) can tell that it missed one
        self.count = 0

    def notify(self) -> None:
        self.count += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, timeout: float) -> None:
        """Return on the next ``notify()`` or after ``timeout`` seconds, whichever is first."""
        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        with anyio.move_on_after(timeout):
            await event.wait()

    def reset(self) -> None:
        """Forget waiters of a previous event loop (an Engine may be used by several runs)."""
        self._event = None
