"""What the execution record (``describe``) says about each attempt, kept on the aggregate.

The record's attempt entries (when each was scheduled, polled, started and last updated, by
whom, how many runs, its error) and the record's start time and retry count are folded into
one JSON attribute of the aggregate, ``attempt_log``, as the lease, start and failure events
are applied. A snapshot therefore carries them, so the record at any version is built from
the nearest snapshot and the events after it, as state is. Times are epoch milliseconds.

The attempt being run (the one most recently leased) is last updated by the latest event:
its ``updated`` is the aggregate's modification time, filled in when the record is read; an
attempt is given its final ``updated`` when another attempt is leased.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from stepsource.aggregates.values import JSONObject

__all__ = ["attempt_failed", "attempt_leased", "attempt_started", "ms", "new_attempt_log"]


def ms(moment: datetime) -> int:
    """Epoch milliseconds of a datetime (as the record writes its times)."""
    return int(moment.timestamp() * 1000)


def new_attempt_log() -> JSONObject:
    """An execution's attempt log before its first lease. ``next_scheduled`` None: the
    execution's creation time; ``current``: the id of the attempt most recently leased."""
    return {"attempts": [], "current": None, "next_scheduled": None, "start": None, "retries": 0}


def _current(log: dict[str, Any]) -> dict[str, Any] | None:
    current = log["current"]
    if current is None:
        return None
    found: dict[str, Any] = next(a for a in log["attempts"] if a["id"] == current)
    return found


def attempt_leased(
    log: dict[str, Any],
    attempt: int,
    executor: str,
    worker_id: str,
    now: datetime,
    created: datetime,
    previous: datetime,
    *,
    taken_over: bool = False,
) -> None:
    """A StepLeased at ``now``; ``previous`` is the time of the event before it;
    ``taken_over``: the lease replaced a lost worker's (not a wake-up or a release)."""
    before = _current(log)
    if before is not None and before["id"] != attempt:
        before["updated"] = ms(previous)  # the attempt's last event was the one before
    entry = next((a for a in log["attempts"] if a["id"] == attempt), None)
    if entry is None:
        scheduled = log["next_scheduled"]
        entry = {
            "id": attempt,
            "scheduled": ms(created) if scheduled is None else scheduled,
            "polled": ms(now),
            "start": None,
            "runs": 0,
            "output": None,
            "updated": None,
        }
        log["attempts"].append(entry)
    entry["runs"] += 1
    if taken_over:
        entry["takeovers"] = entry.get("takeovers", 0) + 1
    entry["executor"] = executor
    entry["ref"] = worker_id
    log["current"] = attempt


def attempt_started(log: dict[str, Any], now: datetime) -> None:
    entry = _current(log)
    if entry is not None:
        entry["start"] = ms(now)
        if log["start"] is None:
            log["start"] = ms(now)


def attempt_failed(
    log: dict[str, Any], now: datetime, error: JSONObject, retry_at_ms: int | None
) -> None:
    entry = _current(log)
    if entry is not None:
        entry["output"] = {"error": error}
    log["next_scheduled"] = retry_at_ms if retry_at_ms is not None else ms(now)
    if retry_at_ms is not None:
        log["retries"] += 1
