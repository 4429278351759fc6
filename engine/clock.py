"""The engine's source of time. Replays never read it: every event carries its timestamp."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["Clock", "SystemClock", "to_ms"]


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class Clock:
    """Wall-clock time in UTC. Subclass to control time in tests."""

    def now(self) -> datetime:
        raise NotImplementedError

    def now_ms(self) -> int:
        return to_ms(self.now())


class SystemClock(Clock):
    def now(self) -> datetime:
        return datetime.now(UTC)
