"""``stepsource check``'s reading of a log: every event decoded and its checksum verified,
every stream without a version gap, and the executions index against the log.

What a backend checks of its own files (SQLite's ``PRAGMA integrity_check``) is the CLI's
part; this module reads through the storage port only, so it checks every backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from stepsource.adapters.ports import RecordedEvent
from stepsource.engine.store import ExecutionStore
from stepsource.errors import StepsourceError
from stepsource.projections.summaries import QUARANTINED, ExecutionSummary

__all__ = ["Damage", "LogCheck", "check_index", "check_log"]

_PAGE = 2000


@dataclass(frozen=True, slots=True)
class Damage:
    """One problem found: where (an execution id, or the file or index), and what."""

    where: str
    what: str


@dataclass
class LogCheck:
    """What a check read and what it found."""

    events: int = 0
    executions: int = 0
    damage: list[Damage] = field(default_factory=list)
    #: per execution: the last version that reads (everything up to it decodes)
    readable: dict[str, int] = field(default_factory=dict)
    #: per execution: the last version stored
    stored: dict[str, int] = field(default_factory=dict)


async def check_log(store: ExecutionStore) -> LogCheck:
    """Read the whole log in global order and decode each stream, reporting every problem
    (one per stream: the first), never stopping at the first damaged stream."""
    report = LogCheck()
    streams: dict[str, list[RecordedEvent]] = {}
    position = 0
    while True:
        records = await store.backend.read_all(position, _PAGE)
        if not records:
            break
        for record in records:
            streams.setdefault(record.stream_id, []).append(record)
        report.events += len(records)
        position = records[-1].position
    report.executions = len(streams)
    for stream_id, records in streams.items():
        records.sort(key=lambda r: r.version)
        report.stored[stream_id] = records[-1].version
        report.readable[stream_id] = _readable(store, stream_id, records, report.damage)
    return report


def _readable(
    store: ExecutionStore, stream_id: str, records: list[RecordedEvent], damage: list[Damage]
) -> int:
    try:
        store.decode(records)
    except StepsourceError as error:
        damage.append(Damage(stream_id, error.reason))
        # the prefix that reads, found one event at a time (damaged streams only)
        good = 0
        for count in range(1, len(records) + 1):
            try:
                store.decode(records[:count])
            except StepsourceError:
                break
            good = records[count - 1].version
        return good
    return records[-1].version if records else 0


def check_index(report: LogCheck, summaries: Iterable[ExecutionSummary]) -> None:
    """Add to ``report`` where the executions index disagrees with the log it read."""
    seen: set[str] = set()
    for summary in summaries:
        eid = summary.execution_id
        seen.add(eid)
        stored = report.stored.get(eid)
        if stored is None:
            report.damage.append(Damage(eid, "the index lists it but the log has no such stream"))
            continue
        readable = report.readable.get(eid, 0)
        if summary.status == QUARANTINED:
            if readable == stored:
                report.damage.append(
                    Damage(eid, "the index shows it quarantined but its log reads: release it")
                )
        elif summary.version != stored:
            report.damage.append(
                Damage(
                    eid,
                    f"the index is at version {summary.version}, the log at {stored}: "
                    "run `stepsource projections rebuild`",
                )
            )
    for eid in report.stored:
        if eid not in seen and report.readable.get(eid, 0) > 0:
            report.damage.append(Damage(eid, "the log has it but the index does not"))
