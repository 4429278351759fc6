"""A clock tests control: skip time by hand, or let idle workers jump to the next timer.

With ``auto=True`` a worker pool that has nothing to run and nothing due advances the clock
to the next due time (a sleep's timer, a wait's timeout, a retry), so a test of a one-hour
sleep runs at once. Like any time-skipping test server, it also makes a timeout fire before
a slow client gets to send its event: use ``auto=False`` and ``skip()`` for those tests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from stepsource.engine.clock import Clock

__all__ = ["SkippingClock"]


class SkippingClock(Clock):
    def __init__(self, *, auto: bool = True) -> None:
        self.skips_idle_time = auto
        self._offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def skip(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += timedelta(seconds=seconds)

    def advance_to_ms(self, epoch_ms: int) -> None:
        """Move time forward to ``epoch_ms`` (no-op if it is already later)."""
        ahead = epoch_ms - self.now_ms()
        if ahead > 0:
            self._offset += timedelta(milliseconds=ahead)
