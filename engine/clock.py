"""The engine's source of time. Replays never read it: every event carries its timestamp."""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["Clock", "SystemClock", "to_ms"]


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


#: the longest sleep, wait, timeout or start delay (about 31.7 years): its due time in epoch
#: milliseconds stays far inside what every backend stores
MAX_WAIT_SECONDS = 10**9


class Clock:
    """Wall-clock time in UTC. Subclass to control time in tests."""

    #: an idle worker pool may call ``advance_to_ms(next due time)`` (test clocks only)
    skips_idle_time = False

    def advance_to_ms(self, epoch_ms: int) -> None:
        raise NotImplementedError("only a test clock skips time")

    def now(self) -> datetime:
        raise NotImplementedError

    def now_ms(self) -> int:
        return to_ms(self.now())


class SystemClock(Clock):
    def now(self) -> datetime:
        return datetime.now(UTC)

    def now_ms(self) -> int:
        """The same millisecond as ``to_ms(self.now())``, without building a datetime (a
        sixth of its cost; the engine reads it several times per operation). A subclass
        that moves :meth:`now` moves this with it."""
        if type(self).now is not SystemClock.now:
            return to_ms(self.now())
        return time.time_ns() // 1_000_000
