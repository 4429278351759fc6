"""``stepsource check``'s reading of a log: every event decoded and its checksum verified,
every stream without a version gap, and the executions index against the log.

The log is read up to the position it had when the check began; the index, read after it,
may be further on while workers run: a row of an execution the log read then moved on from (a
higher version) cannot be compared and is passed over, and a row of an execution created
since is no damage once its stream is found (:attr:`LogCheck.unseen`, confirmed by the
caller). So a check beside running workers reports only what is damaged.

The index is compared row by row with what the log says now: each readable execution's
summary, folded again from its decoded events, must equal its row (every column but the
position), and a row that still shows an execution as readable although its log no longer
reads (an event damaged after the index folded it) is said so. Neither needs a rebuild.

What a backend checks of its own files (SQLite's ``PRAGMA integrity_check``) is the CLI's
part; this module reads through the storage port only, so it checks every backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

from stepsource.adapters.ports import RecordedEvent
from stepsource.engine.store import ExecutionStore
from stepsource.errors import StepsourceError
from stepsource.projections.executions_index import IndexedExecution, from_row, to_row
from stepsource.projections.summaries import QUARANTINED, ExecutionSummary, summarize

__all__ = ["Damage", "LogCheck", "check_index", "check_log", "confirm_unseen"]

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
    #: per readable execution: its summary folded from its decoded events
    summaries: dict[str, ExecutionSummary] = field(default_factory=dict)
    #: the log position the check read up to (what was appended later is not read)
    position: int = 0
    #: index rows the log as read cannot judge, by execution: the version the index shows
    #: (0: the log did not have the execution). Damage unless the stream reached that
    #: version since (it was created, or moved on, while the check ran)
    unseen: dict[str, int] = field(default_factory=dict)


async def check_log(store: ExecutionStore) -> LogCheck:
    """Read the whole log in global order and decode each stream, reporting every problem
    (one per stream: the first), never stopping at the first damaged stream."""
    report = LogCheck(position=await store.backend.max_position())
    streams: dict[str, list[RecordedEvent]] = {}
    position = 0
    while position < report.position:
        records = [
            r
            for r in await store.backend.read_all(position, _PAGE)
            if r.position <= report.position
        ]
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
        report.readable[stream_id] = _readable(store, stream_id, records, report)
    return report


def _readable(
    store: ExecutionStore, stream_id: str, records: list[RecordedEvent], report: LogCheck
) -> int:
    damage = report.damage
    try:
        events = store.decode(records)
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
    summaries: dict[str, ExecutionSummary] = {}
    for event in events:
        summarize(summaries, event)
    if stream_id in summaries:
        report.summaries[stream_id] = summaries[stream_id]
    return records[-1].version if records else 0


def check_index(
    report: LogCheck, summaries: Iterable[ExecutionSummary], *, redact_errors: bool = False
) -> None:
    """Add to ``report`` where the executions index disagrees with the log it read.
    ``redact_errors``: the index keeps error types only (an encrypted log)."""
    seen: set[str] = set()
    for summary in summaries:
        eid = summary.execution_id
        seen.add(eid)
        stored = report.stored.get(eid)
        if stored is None or summary.version > stored:
            # created or moved on since the log was read, or damage: confirm_unseen tells
            report.unseen[eid] = 0 if stored is None else summary.version
            continue
        readable = report.readable.get(eid, 0)
        if summary.status == QUARANTINED:
            if readable == stored:
                report.damage.append(
                    Damage(eid, "the index shows it quarantined but its log reads: release it")
                )
        elif readable < stored:  # damaged after the index folded it: its row is stale
            _stale(report, eid, summary)
        elif summary.version != stored:
            report.damage.append(
                Damage(
                    eid,
                    f"the index is at version {summary.version}, the log at {stored}: "
                    "run `stepsource projections rebuild`",
                )
            )
        else:
            differing = _differing(summary, report.summaries.get(eid), redact_errors)
            if differing:
                report.damage.append(
                    Damage(
                        eid,
                        f"the index row differs from the log in {differing}: run "
                        "`stepsource projections rebuild`",
                    )
                )
    for eid in report.stored:
        if eid not in seen and report.readable.get(eid, 0) > 0:
            report.damage.append(Damage(eid, "the log has it but the index does not"))


async def confirm_unseen(report: LogCheck, store: ExecutionStore) -> None:
    """Report the index rows of :attr:`LogCheck.unseen` whose streams have not reached what
    the index shows by now."""
    for eid, version in report.unseen.items():
        now = await store.backend.stream_version(eid)
        if now == 0:
            report.damage.append(Damage(eid, "the index lists it but the log has no such stream"))
        elif now < version:
            report.damage.append(
                Damage(
                    eid,
                    f"the index is at version {version}, the log at {now}: "
                    "run `stepsource projections rebuild`",
                )
            )
    report.unseen.clear()


def _stale(report: LogCheck, eid: str, summary: ExecutionSummary) -> None:
    """Say, with the log's damage of ``eid``, that the index still shows it as readable."""
    note = (
        f"; the index still shows it {summary.status} (it folded the events before the "
        "damage): `stepsource projections rebuild` shows it quarantined"
    )
    for i, found in enumerate(report.damage):
        if found.where == eid:
            report.damage[i] = replace(found, what=found.what + note)
            return
    report.damage.append(Damage(eid, note[2:]))


def _differing(
    indexed: ExecutionSummary, derived: ExecutionSummary | None, redact_errors: bool
) -> str:
    """The columns in which an index row differs from the summary folded from the log
    ("" if none), compared in their stored form (times in microseconds, errors redacted as
    the index keeps them)."""
    if derived is None:
        return "every column (the log has no StepScheduled for it)"
    names = [f.name for f in fields(ExecutionSummary)]
    stored = from_row(to_row(IndexedExecution(0, derived), redact_errors=redact_errors))
    differ = [name for name in names if getattr(indexed, name) != getattr(stored.summary, name)]
    return ", ".join(
        f"{name} ({getattr(indexed, name)!r} in the index, {getattr(stored.summary, name)!r} "
        "in the log)"
        for name in differ
    )
