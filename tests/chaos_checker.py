"""A Jepsen-style checker for the kill loop (test_chaos.py): journals and side effects against
the final log.

What it reads, all of it plain data collected after the loop:

- the commit journals (``STEPSOURCE_TEST_JOURNAL``, one file per process): every commit writes
  ``attempt <stream> <first> <last> <topics>`` before its append and ``ack <stream> <first>
  <last> <topics>`` once it is durable. An attempt without an ack is *indeterminate*: the
  process died
  (or was refused) in between, and the commit may or may not be in the log;
- the final log, raw (stream, version, topic, position) in global order, as the backend's
  ``read_all`` returns it, and each execution's decoded events;
- the side-effect file of the ``ctx.do`` bodies (``start``/``end`` lines, see chaos_app.py);
- the kills (which process, how) and the processes that reported losing a lease.

What it checks (each a count that must be zero):

- **lost**: an acknowledged commit whose events are not all in the log with the journaled
  topics at the journaled versions;
- **unexpected**: a log event that no journaled attempt explains: no attempt of that stream
  covers its version with that topic *and* is wholly in the log (a commit is atomic: one
  landed in part is unexpected too);
- **duplicates**: a (stream, version) read twice from the log, a version acknowledged to two
  commits, an operation recorded twice in an execution (same attempt, scope and ordinal), a
  ``ctx.do`` name with more than one ``SubStepCompleted``;
- **gaps**: a stream whose versions do not run 1..n, or global positions that do not grow;
- **terminal**: an execution without exactly one terminal event, or with events after it, or
  one that did not complete;
- **orphans**: an execution in the log that is neither one the client started nor a child its
  parent recorded (``ChildStarted``): a child started a second time by a resumed parent;
- **re-runs**: a ``ctx.do`` body that started after its result was recorded (the event's own
  timestamp; every process reads one system clock), a recorded result whose body run is not
  in the side-effect file, a body run of a name that has no record, and a body run that was
  not recorded by a process that was neither killed nor reported losing its lease (the only
  two reasons a body may run again); a killed process accounts for at most one extra run of
  each body.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from stepsource.aggregates import events as ev

__all__ = [
    "BodyRun",
    "ChaosReport",
    "JournalLine",
    "Kill",
    "LogEvent",
    "SubStepRecord",
    "check",
    "parse_effects",
    "parse_journal",
    "substep_records",
]

TERMINAL = frozenset({"StepCompleted", "StepFailed", "StepCancelled"})


def short_topic(topic: str) -> str:
    return topic.removeprefix("stepsource:")


# -- inputs ------------------------------------------------------------------------------------
#: what pairs an ack with its attempt: stream, first and last version, topics
JournalKey = tuple[str, int, int, tuple[str, ...]]


@dataclass(frozen=True)
class JournalLine:
    kind: str  # "attempt" or "ack"
    stream: str
    first: int
    last: int
    topics: tuple[str, ...]  # attempts only
    journal: str  # which process's journal
    line: int

    @property
    def key(self) -> JournalKey:
        """What pairs an ack with its attempt: two commits of one stream at the same versions
        may be in flight in one process at once (an actor that lost its lease while its
        commit hung, and the one that took the execution over): their topics tell them apart."""
        return (self.stream, self.first, self.last, self.topics)


@dataclass(frozen=True)
class LogEvent:
    stream: str
    version: int
    topic: str
    position: int


@dataclass(frozen=True)
class BodyRun:
    execution: str
    name: str
    run: str
    pid: int
    start_ns: int
    end_ns: int | None  # None: the process died (or was cancelled) inside the body


@dataclass(frozen=True)
class SubStepRecord:
    execution: str
    name: str
    run: str
    version: int
    recorded_ns: int


@dataclass(frozen=True)
class Kill:
    slot: str
    pid: int
    how: str  # "random" or the kill point that fired


def parse_journal(name: str, text: str) -> tuple[list[JournalLine], int]:
    """The journal's lines, and how many were torn (a process killed mid-line)."""
    lines: list[JournalLine] = []
    torn = 0
    rows = text.split("\n")
    for number, row in enumerate(rows, 1):
        if not row:
            continue
        parts = row.split(" ")
        try:
            kind, stream, first, last = parts[0], parts[1], int(parts[2]), int(parts[3])
            if kind not in ("attempt", "ack") or first < 1 or last < first:
                raise ValueError(row)
            topics = tuple(parts[4].split(","))
            if len(topics) != last - first + 1:
                raise ValueError(row)
        except (IndexError, ValueError):
            if number == len(rows):  # the last line, unterminated: a kill mid-write
                torn += 1
                continue
            raise ValueError(f"journal {name} line {number} is malformed: {row!r}") from None
        lines.append(JournalLine(kind, stream, first, last, topics, name, number))
    return lines, torn


def parse_effects(text: str) -> list[BodyRun]:
    """The body runs recorded in the side-effect file (start and end lines joined by run id)."""
    starts: dict[str, tuple[str, str, int, int]] = {}
    ends: dict[str, int] = {}
    for row in text.splitlines():
        kind, execution, name, run, pid, ns = row.split(" ")
        if kind == "start":
            starts[run] = (execution, name, int(pid), int(ns))
        elif kind == "end":
            ends[run] = int(ns)
        else:
            raise ValueError(f"malformed side-effect line {row!r}")
    unknown = set(ends) - set(starts)
    if unknown:
        raise ValueError(f"body runs that ended without starting: {sorted(unknown)}")
    return [
        BodyRun(execution, name, run, pid, start, ends.get(run))
        for run, (execution, name, pid, start) in starts.items()
    ]


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000


def substep_records(execution_id: str, events: Sequence[ev.ExecutionEvent]) -> list[SubStepRecord]:
    """The ``SubStepCompleted`` records of one execution, with the body run each one kept."""
    records = []
    for event in events:
        if isinstance(event, ev.SubStepCompleted):
            value = event.value
            run = str(value.get("run", "")) if isinstance(value, dict) else ""
            records.append(
                SubStepRecord(
                    execution_id, event.name, run, event.originator_version, _ns(event.timestamp)
                )
            )
    return records


def recorded_ops(events: Sequence[ev.ExecutionEvent]) -> list[tuple[Any, ...]]:
    """The coordinates of every recorded operation (what a replay matches on)."""
    return [
        (e.attempt, e.scope, e.seq, e.name if isinstance(e, ev.SubStepCompleted) else None)
        for e in events
        if isinstance(e, ev.Recorded)
    ]


# -- the report --------------------------------------------------------------------------------
@dataclass
class ChaosReport:
    backend: str = ""
    kills: int = 0
    kills_random: int = 0
    kills_at_points: dict[str, int] = field(default_factory=dict)
    processes: int = 0
    zombies: int = 0
    executions: int = 0
    completed: int = 0
    events: int = 0
    attempted_commits: int = 0
    acked_commits: int = 0
    acked_events: int = 0
    indeterminate_commits: int = 0
    indeterminate_landed: int = 0
    torn_journal_lines: int = 0
    body_runs: int = 0
    body_reruns: int = 0  # runs whose result was not kept, each explained by a kill or a takeover
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    gaps: int = 0
    terminal_errors: int = 0
    orphans: int = 0
    recorded_reruns: int = 0
    unexplained_reruns: int = 0
    duration_s: float = 0.0
    orphan_executions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    FAULTS = (
        "lost",
        "unexpected",
        "duplicates",
        "gaps",
        "terminal_errors",
        "orphans",
        "recorded_reruns",
        "unexplained_reruns",
    )

    @property
    def ok(self) -> bool:
        return not self.problems and all(getattr(self, name) == 0 for name in self.FAULTS)

    def problem(self, counter: str, message: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.problems) < 50:
            self.problems.append(f"{counter}: {message}")

    def summary(self) -> str:
        points = ", ".join(f"{k} {v}" for k, v in sorted(self.kills_at_points.items()))
        lines = [
            f"chaos [{self.backend}] {self.duration_s:.1f} s, {self.processes} worker processes",
            f"  kills        {self.kills} (random {self.kills_random}; at points: "
            f"{points or 'none'}); zombies {self.zombies}",
            f"  executions   {self.executions} ({self.completed} completed), events {self.events}",
            f"  commits      attempted {self.attempted_commits}, acked {self.acked_commits} "
            f"({self.acked_events} events), indeterminate {self.indeterminate_commits} "
            f"({self.indeterminate_landed} landed), torn journal lines {self.torn_journal_lines}",
            f"  ctx.do       body runs {self.body_runs}, re-runs explained by kills "
            f"{self.body_reruns}",
            f"  lost {self.lost}  unexpected {self.unexpected}  duplicates {self.duplicates}  "
            f"gaps {self.gaps}  terminal errors {self.terminal_errors}  orphans {self.orphans}  "
            f"recorded re-runs {self.recorded_reruns}  unexplained re-runs "
            f"{self.unexplained_reruns}",
        ]
        lines += [f"  ! {p}" for p in self.problems]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# -- the checks --------------------------------------------------------------------------------
def check(
    *,
    backend: str,
    journals: Mapping[str, str],
    log: Sequence[LogEvent],
    decoded: Mapping[str, Sequence[ev.ExecutionEvent]],
    effects: str,
    kills: Sequence[Kill],
    zombie_pids: Iterable[int],
    processes: int,
    started: Iterable[str],
) -> ChaosReport:
    report = ChaosReport(backend=backend, processes=processes)
    report.kills = len(kills)
    report.kills_random = sum(1 for k in kills if k.how == "random")
    report.kills_at_points = dict(Counter(k.how for k in kills if k.how != "random"))
    zombies = set(zombie_pids)
    report.zombies = len(zombies)

    # the journals
    attempts: list[JournalLine] = []
    acks: list[tuple[JournalLine, JournalLine | None]] = []  # (ack, the attempt it confirms)
    for name, text in sorted(journals.items()):
        lines, torn = parse_journal(name, text)
        report.torn_journal_lines += torn
        open_attempts: dict[JournalKey, JournalLine] = {}
        for line in lines:
            if line.kind == "attempt":
                attempts.append(line)
                open_attempts[line.key] = line
            else:
                acks.append((line, open_attempts.pop(line.key, None)))
    report.attempted_commits = len(attempts)
    report.acked_commits = len(acks)
    report.acked_events = sum(ack.last - ack.first + 1 for ack, _ in acks)

    # the log: duplicates, gaps, positions
    report.events = len(log)
    topic_at: dict[tuple[str, int], str] = {}
    by_stream: dict[str, list[int]] = defaultdict(list)
    previous = None
    for event in log:
        key = (event.stream, event.version)
        if key in topic_at:
            report.problem("duplicates", f"{event.stream} v{event.version} is in the log twice")
        topic_at[key] = short_topic(event.topic)
        by_stream[event.stream].append(event.version)
        if previous is not None and event.position <= previous:
            report.problem("gaps", f"position {event.position} after {previous} in read_all")
        previous = event.position
    for stream, versions in by_stream.items():
        if sorted(set(versions)) != list(range(1, len(set(versions)) + 1)):
            missing = sorted(set(range(1, max(versions) + 1)) - set(versions))
            report.problem("gaps", f"{stream} lacks versions {missing}")

    def landed(line: JournalLine) -> bool:
        return all(
            topic_at.get((line.stream, line.first + i)) == topic
            for i, topic in enumerate(line.topics)
        )

    # lost: every acknowledged commit is in the log, as it was attempted
    acked_versions: Counter[tuple[str, int]] = Counter()
    acked_keys: set[tuple[JournalKey, str]] = set()
    for ack, attempt in acks:
        for version in range(ack.first, ack.last + 1):
            acked_versions[(ack.stream, version)] += 1
        if attempt is None:
            report.problem("lost", f"ack without an attempt: {ack}")
            continue
        acked_keys.add((ack.key, ack.journal))
        if not landed(attempt):
            found = [topic_at.get((ack.stream, v)) for v in range(ack.first, ack.last + 1)]
            report.problem(
                "lost",
                f"acked {ack.stream} v{ack.first}-{ack.last} {list(attempt.topics)} "
                f"({ack.journal}:{ack.line}) but the log has {found}",
            )
    for (stream, version), times in acked_versions.items():
        if times > 1:
            report.problem("duplicates", f"{stream} v{version} acknowledged {times} times")
    for attempt in attempts:
        if (attempt.key, attempt.journal) not in acked_keys:
            report.indeterminate_commits += 1
            report.indeterminate_landed += landed(attempt)

    # unexpected: every log event belongs to an attempted commit that landed whole
    explained: set[tuple[str, int]] = set()
    for attempt in attempts:
        if landed(attempt):
            explained.update((attempt.stream, v) for v in range(attempt.first, attempt.last + 1))
    for event in log:
        if (event.stream, event.version) not in explained:
            report.problem(
                "unexpected",
                f"{event.stream} v{event.version} {short_topic(event.topic)} was never attempted",
            )

    # every execution is one the client started or a child its parent recorded
    report.executions = len(by_stream)
    known = set(started)
    for events in decoded.values():
        known.update(e.child_execution_id for e in events if isinstance(e, ev.ChildStarted))
    for stream in sorted(known - set(by_stream)):
        report.problem("lost", f"{stream} was started or recorded as a child but has no events")
    for stream in sorted(set(by_stream) - known):
        first = decoded.get(stream, [None])[0]
        parent = getattr(first, "parent_execution_id", None)
        report.orphan_executions.append(stream)
        report.problem(
            "orphans",
            f"{stream} ({getattr(first, 'step_id', '?')}) names parent {parent}, "
            "which never recorded it: a child started twice",
        )

    # terminal events: exactly one, last, and a completion
    for stream, versions in by_stream.items():
        topics = [topic_at[(stream, v)] for v in sorted(set(versions))]
        ends = [i for i, topic in enumerate(topics) if topic in TERMINAL]
        if len(ends) != 1 or ends[0] != len(topics) - 1:
            report.problem("terminal_errors", f"{stream}: terminal events at {ends} of {topics}")
        elif topics[-1] != "StepCompleted":
            events = decoded.get(stream) or []
            why = getattr(events[-1], "reason", "") if events else ""
            report.problem(
                "terminal_errors", f"{stream} ended with {topics[-1]}" + (f": {why}" if why else "")
            )
        else:
            report.completed += 1

    # recorded operations and sub-step records in the decoded executions
    records: dict[tuple[str, str], list[SubStepRecord]] = defaultdict(list)
    for execution, events in decoded.items():
        for op, times in Counter(recorded_ops(events)).items():
            if times > 1:
                report.problem("duplicates", f"{execution}: operation {op} recorded {times} times")
        for record in substep_records(execution, events):
            records[(execution, record.name)].append(record)
    for (execution, name), kept_records in records.items():
        if len(kept_records) > 1:
            times = len(kept_records)
            report.problem("duplicates", f"{execution}: ctx.do({name!r}) recorded {times}x")

    # ctx.do bodies: never after their record; every extra run explained by a kill or takeover
    runs = parse_effects(effects)
    report.body_runs = len(runs)
    runs_of: dict[tuple[str, str], list[BodyRun]] = defaultdict(list)
    for run in runs:
        runs_of[(run.execution, run.name)].append(run)
    killed = Counter(k.pid for k in kills)
    for body in sorted(set(runs_of) - set(records)):
        report.problem("unexplained_reruns", f"{body}: bodies ran, no result was recorded")
    for body, kept_records in sorted(records.items()):
        record = kept_records[0]
        mine = runs_of.get(body, [])
        kept = [run for run in mine if run.run == record.run]
        if not kept:
            report.problem(
                "unexplained_reruns", f"{body}: the recorded run {record.run} never ran its body"
            )
        for run in mine:
            if run.start_ns > record.recorded_ns:
                report.problem(
                    "recorded_reruns",
                    f"{body}: a body started in pid {run.pid} "
                    f"{(run.start_ns - record.recorded_ns) / 1e6:.1f} ms after its result was "
                    f"recorded (v{record.version})",
                )
        extra = Counter(run.pid for run in mine if run.run != record.run)
        report.body_reruns += sum(extra.values())
        for pid, times in extra.items():
            if pid in zombies:
                continue  # it lost its lease: it may have run the body more than once
            if times > killed[pid]:
                report.problem(
                    "unexplained_reruns",
                    f"{body}: pid {pid} ran the body {times} time(s) without its result being "
                    f"kept, but was killed {killed[pid]} time(s) and never lost its lease",
                )
    return report
