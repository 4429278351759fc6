"""When a schedule fires: its slots, from a cron expression or a fixed period.

A schedule's *slots* are instants (epoch milliseconds). ``cron`` expressions are evaluated by
cronsim (Debian cron's rules) in the schedule's time zone; five fields (minute hour
day-of-month month day-of-week) or six with a leading seconds field (``"* * * * * *"``: every
second). ``every`` slots are the multiples of the period counted from the Unix epoch (UTC),
so every process computes the same ones.

**Daylight-saving time** (Debian cron's rule, as cronsim implements it): an expression with a
fixed minute and hour (``"30 2 * * *"``) fires once a day whatever the clocks do: a time that
does not exist that day (the spring-forward gap) fires at the first instant after the gap, and
a time that happens twice (the fall-back repeat) fires once, at its first occurrence. An
expression with a wildcard or a step in its minute or hour field (``"*/5 * * * *"``,
``"0 * * * *"``) and a six-field expression follow elapsed time: every real period, straight
through the change. ``every`` knows no time zone.

Each slot has a *slot key* (``schedule:<name>@<UTC ISO time>``): the business key of the
execution the slot starts, so the log's version check makes a second start of a slot
impossible on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from stepsource.errors import UsageError

__all__ = ["OVERLAPS", "ScheduleSpec", "slot_key", "slot_text"]

#: the bound (s) of a period and of a catch-up window, excluded: a run waits less than this
#: for its next slot (the longest durable wait, engine/clock.py's MAX_WAIT_SECONDS), and
#: its slots stay dates a datetime can hold
MAX_PERIOD_SECONDS = 10**9

#: what a slot does while the execution the previous slot started still runs
OVERLAPS = ("skip", "buffer_one", "allow")


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """When a schedule fires and what it does about overlaps and missed slots (validated)."""

    cron: str | None
    every_ms: int | None
    timezone: str
    overlap: str
    catch_up_ms: int

    @classmethod
    def build(
        cls,
        name: str,
        *,
        cron: str | None,
        every: float | timedelta | None,
        timezone: str,
        overlap: str,
        catch_up: float | timedelta,
    ) -> ScheduleSpec:
        """The spec, or a UsageError naming the schedule and the fix."""

        def refuse(message: str, hint: str) -> UsageError:
            return UsageError(f"schedule {name!r}: {message}", hint=hint)

        if (cron is None) == (every is None):
            raise refuse(
                "give cron= or every=, exactly one",
                'For example cron="*/5 * * * *" or every=timedelta(minutes=5)',
            )
        if not isinstance(timezone, str):
            raise refuse(f"timezone must be a str, not {timezone!r}", 'For example "UTC"')
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise refuse(
                f"unknown time zone {timezone!r}", 'Use an IANA name such as "Europe/Paris"'
            ) from None
        every_ms = None
        if every is not None:
            seconds = every.total_seconds() if isinstance(every, timedelta) else every
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
                or not 1 <= seconds < MAX_PERIOD_SECONDS
                or seconds * 1000 != int(seconds * 1000)
            ):
                raise refuse(
                    "every must be at least 1 second and under 10**9 (about 31 years), in "
                    f"whole milliseconds, not {every!r}",
                    "Pass seconds (every=60) or a timedelta",
                )
            every_ms = int(seconds * 1000)
        if cron is not None:
            if not isinstance(cron, str):
                raise refuse(f"cron must be a str, not {cron!r}", 'For example "0 9 * * MON"')
            try:
                next(CronSim(cron, datetime.now(zone)))
            except (CronSimError, StopIteration) as error:
                raise refuse(
                    f"bad cron expression {cron!r} ({error or 'it never fires'})",
                    "Five fields (minute hour day-of-month month day-of-week), or six with "
                    "seconds first",
                ) from None
        if overlap not in OVERLAPS:
            raise refuse(
                f"overlap must be one of {', '.join(OVERLAPS)}, not {overlap!r}",
                'overlap="skip" drops a slot while the last run runs',
            )
        window = catch_up.total_seconds() if isinstance(catch_up, timedelta) else catch_up
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not math.isfinite(window)
            or not 1 <= window < MAX_PERIOD_SECONDS
        ):
            raise refuse(
                "catch_up must be a window of at least 1 second and under 10**9 (about 31 "
                f"years), not {catch_up!r}",
                "catch_up=timedelta(hours=1) fires slots missed within the last hour",
            )
        return cls(cron, every_ms, timezone, overlap, int(window * 1000))

    def next_slot(self, after_ms: int) -> int:
        """The first slot strictly after ``after_ms``."""
        if self.every_ms is not None:
            return (after_ms // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        # cronsim starts at whole seconds: from the second of after_ms, next() is later
        start = datetime.fromtimestamp(after_ms // 1000, tz=ZoneInfo(self.timezone))
        found = next(CronSim(self.cron, start))
        return int(found.timestamp()) * 1000

    def slot_before(self, before_ms: int) -> int:
        """The last slot strictly before ``before_ms`` (to pass over many missed slots at
        once)."""
        if self.every_ms is not None:
            return (before_ms - 1) // self.every_ms * self.every_ms
        assert self.cron is not None
        # reversed from the whole second after before_ms - 1: slots at or before that second
        start = datetime.fromtimestamp((before_ms - 1) // 1000 + 1, tz=ZoneInfo(self.timezone))
        found = next(CronSim(self.cron, start, reverse=True))
        return int(found.timestamp()) * 1000

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.timezone})"
        assert self.every_ms is not None
        return f"every {self.every_ms / 1000:g} s"


def slot_text(slot_ms: int) -> str:
    """A slot as UTC ISO text (milliseconds only when it has some)."""
    moment = datetime.fromtimestamp(slot_ms / 1000, tz=UTC)
    spec = "milliseconds" if slot_ms % 1000 else "seconds"
    return moment.isoformat(timespec=spec)


def slot_key(name: str, slot_ms: int) -> str:
    """The business key of the execution the slot ``slot_ms`` of schedule ``name`` starts."""
    return f"schedule:{name}@{slot_text(slot_ms)}"
