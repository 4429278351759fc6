"""Loading and committing StepExecution aggregates through a storage backend.

The one place where domain events become stored bytes and back. A commit is every pending
event of one aggregate, appended atomically with the version the aggregate was loaded at;
concurrent commits from many actors share the backend's group commit.
"""

from __future__ import annotations

import dataclasses
import operator
import uuid
from collections.abc import Callable, Sequence
from contextvars import ContextVar

from stepsource.adapters.ports import (
    Backend,
    Commit,
    Outgoing,
    QueueUpdate,
    RecordedEvent,
    appends_now,
)
from stepsource.aggregates.events import ExecutionEvent, StepScheduled, StepStarted
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import DEFAULT_LIMITS, Limits
from stepsource.engine.checksums import PREFIX
from stepsource.engine.codec import EventCodec
from stepsource.engine.faults import journal, journaling
from stepsource.engine.snapshot_ladder import rung_key, rung_keys
from stepsource.engine.snapshots import attempt_key, decode_snapshot, encode_snapshot
from stepsource.engine.worklog import log_commit
from stepsource.errors import (
    CorruptLogError,
    LimitExceededError,
    UnknownExecutionError,
    UsageError,
)
from stepsource.projections.folds import Passed, replay

__all__ = [
    "MAX_VERSION",
    "UNCOMMITTED",
    "AppendedListener",
    "ExecutionStore",
    "PreparedCommit",
    "check_version",
    "has_checksum",
    "parse_execution_id",
]

_VERSION = operator.attrgetter("version")

#: ``listener(stream_id, last_position, events)``: a commit of ``events`` is durable, the
#: last of them at ``last_position`` (:attr:`ExecutionStore.appended`)
AppendedListener = Callable[[str, int, Sequence[ExecutionEvent]], None]

#: True in a task whose appends join a transaction of the backend's that commits later (a
#: transactional step, :mod:`.transactions`): their positions are not final until then, and
#: a rolled-back one is taken again by the next commit, so they are not told to the
#: :attr:`ExecutionStore.appended` listener
UNCOMMITTED: ContextVar[bool] = ContextVar("stepsource_uncommitted", default=False)


def _journal(kind: str, commit: Commit) -> None:
    first = commit.expected_version + 1
    topics = ",".join(e.topic.removeprefix("stepsource:") for e in commit.events)
    journal(kind, commit.stream_id, first, first + len(commit.events) - 1, topics)


@dataclasses.dataclass(slots=True)
class PreparedCommit:
    """An aggregate's pending events, taken from it and encoded, and the commits that carry
    them, in order (each with the range of ``pending`` it holds): :meth:`ExecutionStore.prepare`."""

    aggregate: StepExecution
    pending: list[ExecutionEvent]
    parts: list[tuple[int, int, Commit]]
    #: the first part's attempt is journaled already (tests only: ``engine/faults.py``)
    journaled: bool = False


def has_checksum(codec: EventCodec, record: RecordedEvent, *, after_checked: bool = False) -> bool:
    """Whether ``record`` carries a checksum (not verified here). ``after_checked``: an
    earlier event of its stream had one, so a record without one is a CorruptLogError
    naming the execution and the version (a stream never goes back)."""
    data = record.data
    if not codec.encrypted and type(data) is bytes:
        if data.startswith(PREFIX):
            return True
        if after_checked:
            codec.plaintext(record, checked=True)  # raises, worded
        return False
    return codec.plaintext(record, checked=after_checked)[1]


def parse_execution_id(execution_id: object) -> str:
    """The canonical string form of an execution id, or UnknownExecutionError."""
    try:
        return str(uuid.UUID(str(execution_id)))
    except ValueError:
        raise UnknownExecutionError(
            f"{execution_id!r} is not an execution id (a UUID)",
            hint="Use the execution_id of a handle, or list executions with `stepsource ls`",
        ) from None


#: the largest version a backend stores (a signed 64-bit integer)
MAX_VERSION = 2**63 - 1


def check_version(
    at_version: int | None, execution_id: object, name: str = "at_version", *, needed: bool = False
) -> None:
    """``at_version`` (the argument ``name``) as a version: an int from 1 to
    :data:`MAX_VERSION`, or None unless ``needed``; a UsageError naming the argument
    otherwise."""
    if (at_version is not None or needed) and (
        at_version is None
        or isinstance(at_version, bool)
        or not isinstance(at_version, int)
        or not 1 <= at_version <= MAX_VERSION
    ):
        shown = (
            f"{at_version:.3g}"
            if isinstance(at_version, int) and not isinstance(at_version, bool)
            else repr(at_version)
        )
        raise UsageError(
            f"{name} must be an int from 1 to 2**63-1, not {shown}",
            execution_id=execution_id if isinstance(execution_id, str) else None,
            hint="Versions count an execution's events from 1 (`stepsource events ID`)",
        )


class ExecutionStore:
    def __init__(
        self,
        backend: Backend,
        codec: EventCodec,
        limits: Limits = DEFAULT_LIMITS,
        *,
        snapshot_every: int | None = None,
    ):
        self.backend = backend
        self.codec = codec
        self.limits = limits
        self.snapshot_every = snapshot_every
        #: told of each commit once durable, where a commit's events take consecutive
        #: positions (the executions index folds them without reading them back:
        #: :mod:`.index_feed`); None: nobody listens
        self.appended: AppendedListener | None = None
        #: the backend writes a commit at once where it can (:meth:`write_now`)
        self.appends_now = appends_now(backend)

    async def events(
        self,
        execution_id: str,
        from_version: int | None = None,
        to_version: int | None = None,
    ) -> list[ExecutionEvent]:
        execution_id = parse_execution_id(execution_id)
        first = from_version or 1
        records, lead = await self._read(execution_id, first, to_version)
        return self.decode(records, expect_from=first - lead)[lead:]

    async def _read(
        self, execution_id: str, first: int, to_version: int | None
    ) -> tuple[list[RecordedEvent], int]:
        """The stream's records from ``first``, and how many lead them (0 or 1): a read that
        starts inside the stream with an event without a checksum takes the event before it
        too, whose checksum (or none) says whether this one may lack it. Logs written with
        checksums never need that read."""
        records = await self.backend.read_stream(execution_id, first, to_version)
        if (
            first > 1
            and records
            and records[0].version == first
            and not has_checksum(self.codec, records[0])
        ):
            previous = await self.backend.read_stream(execution_id, first - 1, first - 1)
            if previous:
                return [*previous, *records], 1
        return records, 0

    def decode(
        self, records: Sequence[RecordedEvent], *, expect_from: int = 1
    ) -> list[ExecutionEvent]:
        """Decode one stream's records, which must run without a gap from ``expect_from``."""
        self._check_gapless(records, expect_from)
        return self.codec.decode_many(records)

    def _check_gapless(self, records: Sequence[RecordedEvent], expect_from: int) -> None:
        versions = list(map(_VERSION, records))
        if versions != list(range(expect_from, expect_from + len(versions))):
            offset = next(n for n, version in enumerate(versions) if version != expect_from + n)
            # the records before the gap decode first, as a one-by-one read would
            self.codec.decode_many(records[:offset])
            record = records[offset]
            raise CorruptLogError(
                f"the log has version {record.version} where version "
                f"{expect_from + offset} was expected: events are missing",
                execution_id=record.stream_id,
                hint="Restore the store from a backup; the engine will not serve a shorter history",
            )

    def decode_all(self, records: Sequence[RecordedEvent]) -> list[ExecutionEvent]:
        """Decode events of many streams (as read in global order)."""
        return self.codec.decode_many(records)

    async def load(
        self,
        execution_id: str,
        *,
        at_version: int | None = None,
        with_events: bool = True,
        aggregate_only: bool = False,
    ) -> tuple[StepExecution, list[ExecutionEvent]]:
        """The aggregate (up to ``at_version``) and the events it was folded from.

        With ``with_events=False`` and snapshots on, the aggregate starts from the newest
        snapshot and only the events after it are read (and returned). With
        ``aggregate_only`` (implies ``with_events=False``) no events are returned, and
        those whose fold only advances the version and time are not parsed whole
        (:meth:`EventCodec.fold_many`): what a query of the aggregate needs.
        """
        execution_id = parse_execution_id(execution_id)
        with_events = with_events and not aggregate_only
        start: StepExecution | None = None
        if not with_events and self.snapshot_every:
            start = await self._nearest_snapshot(execution_id, at_version)
        first = start.version + 1 if start is not None else 1
        folded: Sequence[ExecutionEvent | Passed]
        if aggregate_only:
            records, lead = await self._read(execution_id, first, at_version)
            self._check_gapless(records, first - lead)
            # with a leading event, decoded whole: a fold would merge it into a run
            folded = (
                self.codec.fold_many(records) if not lead else self.codec.decode_many(records)[1:]
            )
            events: list[ExecutionEvent] = []
        else:
            folded = events = await self.events(execution_id, first, at_version)
        if start is None:
            if not folded:
                raise UnknownExecutionError(
                    "no such execution in this backend",
                    execution_id=execution_id,
                    hint="Check the id and the backend URL (--url or STEPSOURCE_URL)",
                )
            if not isinstance(folded[0], StepScheduled):
                raise CorruptLogError(
                    f"the execution's first event is {type(folded[0]).__name__}, not StepScheduled",
                    execution_id=execution_id,
                )
        aggregate = replay(folded, start=start)
        assert aggregate is not None
        aggregate.limits = self.limits
        return aggregate, events

    async def _nearest_snapshot(
        self, execution_id: str, at_version: int | None
    ) -> StepExecution | None:
        """The aggregate of the newest readable snapshot at or below ``at_version``: the
        latest one, the one taken as the latest attempt began (older than the latest, so it
        serves versions before it), or, for a version far back, its rung of the ladder
        (:mod:`~stepsource.engine.snapshot_ladder`)."""
        cipher = self.codec.cipher
        found = await self.backend.latest_snapshot(execution_id, at_version)
        if found is not None and found.version == at_version:
            return decode_snapshot(found, cipher)  # nothing nearer can exist
        attempt = await self.backend.latest_snapshot(attempt_key(execution_id), at_version)
        candidates = [s for s in (found, attempt) if s is not None]
        nearest = max((s.version for s in candidates), default=0)
        every = self.snapshot_every
        if every and at_version is not None and nearest + every < at_version:  # far back
            for key in rung_keys(execution_id, at_version, every, above=nearest):
                rung = await self.backend.latest_snapshot(key, at_version)
                if rung is not None:
                    candidates.append(rung)
                    break
        best = None
        for snapshot in sorted(candidates, key=lambda s: -s.version):
            best = decode_snapshot(snapshot, cipher)
            if best is not None:
                break
        return best

    def _passes_rung(self, aggregate: StepExecution, first_version: int) -> bool:
        """Whether a commit of versions ``first_version`` up to the aggregate's passes a
        multiple of ``snapshot_every`` (then the latest snapshot and a rung are saved)."""
        every = self.snapshot_every
        if not every:
            return False
        return aggregate.version // every > (first_version - 1) // every

    def _snapshot_due(
        self, aggregate: StepExecution, first_version: int, last: ExecutionEvent
    ) -> bool:
        """Whether such a commit, ending with ``last``, is followed by a snapshot
        (:meth:`_snapshot`)."""
        return bool(self.snapshot_every) and (
            self._passes_rung(aggregate, first_version) or isinstance(last, StepStarted)
        )

    async def _snapshot(
        self, aggregate: StepExecution, first_version: int, last: ExecutionEvent
    ) -> None:
        every = self.snapshot_every
        if not every:
            return
        if self._passes_rung(aggregate, first_version):
            snapshot = encode_snapshot(aggregate, self.codec.cipher)
            await self.backend.save_snapshot(snapshot)
            rung = rung_key(aggregate.execution_id, aggregate.version, every)
            await self.backend.save_snapshot(dataclasses.replace(snapshot, stream_id=rung))
        if isinstance(last, StepStarted):  # an attempt begins: what resuming it starts from
            key = attempt_key(aggregate.execution_id)
            await self.backend.save_snapshot(encode_snapshot(aggregate, self.codec.cipher, key))

    async def attempt_start(self, execution_id: str, version: int) -> StepExecution | None:
        """The aggregate as it was at ``version``, the StepStarted of its latest attempt, from
        the snapshot taken then (None without one: then replay)."""
        if not self.snapshot_every:
            return None
        found = await self.backend.latest_snapshot(attempt_key(execution_id), version)
        if found is None or found.version != version:
            return None
        aggregate = decode_snapshot(found, self.codec.cipher)
        if aggregate is not None:
            aggregate.limits = self.limits
        return aggregate

    async def commit(
        self,
        aggregate: StepExecution,
        *,
        queue: QueueUpdate | None = None,
        lease_owner: str | None = None,
        consumed: Sequence[int] = (),
        outbox: Sequence[Outgoing] = (),
    ) -> list[ExecutionEvent]:
        """Append the aggregate's pending events; return them once durable.

        They are one commit unless they do not fit the backend's largest commit: then they
        are split, in order, into commits that do (the queue update, the consumed inbox items
        and the outbox go with the last). Each part is atomic and the parts are appended one
        after the other, so a crash between them leaves a prefix of the operations durable,
        as a crash between two operations would.
        """
        prepared = self.prepare(
            aggregate, queue=queue, lease_owner=lease_owner, consumed=consumed, outbox=outbox
        )
        return await self.write(prepared)

    def prepare(
        self,
        aggregate: StepExecution,
        *,
        queue: QueueUpdate | None = None,
        lease_owner: str | None = None,
        consumed: Sequence[int] = (),
        outbox: Sequence[Outgoing] = (),
    ) -> PreparedCommit:
        """Take the aggregate's pending events and encode them into the commits that will
        carry them (see :meth:`commit`); nothing is written yet."""
        pending, bodies = aggregate.collect_encoded()
        if not pending:
            return PreparedCommit(aggregate, [], [])
        stream_id = aggregate.execution_id
        encoded = self.codec.encode_many(pending, stream_id, bodies)
        limit = self.backend.max_commit_bytes
        bounds: list[tuple[int, int]] = []  # [start, end) of each commit
        start, size = 0, 0
        for index, event in enumerate(encoded):
            length = len(event.data)
            if length > limit:
                raise LimitExceededError(
                    f"{pending[index].describe()} is {length} bytes, larger than the backend "
                    f"accepts in one commit ({limit})",
                    execution_id=aggregate.execution_id,
                    step_id=aggregate.step_id,
                    hint="Store large data outside the execution and record a reference",
                )
            if size + length > limit:
                bounds.append((start, index))
                start, size = index, 0
            size += length
        bounds.append((start, len(encoded)))
        first_version = pending[0].originator_version
        parts: list[tuple[int, int, Commit]] = []
        for number, (begin, end) in enumerate(bounds):
            last = number == len(bounds) - 1
            commit = Commit(
                stream_id=stream_id,
                expected_version=first_version + begin - 1,
                events=encoded[begin:end],
                queue=queue if last else None,
                lease_owner=lease_owner,
                consumed=tuple(consumed) if last else (),
                outbox=tuple(outbox) if last else (),
            )
            parts.append((begin, end, commit))
        return PreparedCommit(aggregate, pending, parts)

    async def write(self, prepared: PreparedCommit) -> list[ExecutionEvent]:
        """Append the prepared commits in order; return their events once durable."""
        pending = prepared.pending
        if not pending:
            return []
        for begin, end, commit in prepared.parts:
            attempted, prepared.journaled = prepared.journaled, False  # the first part only
            self._tell(commit, await self._append(commit, attempted), pending[begin:end])
        await self._snapshot(prepared.aggregate, pending[0].originator_version, pending[-1])
        log_commit(prepared.aggregate, pending)
        return pending

    def write_now(self, prepared: PreparedCommit) -> list[ExecutionEvent] | None:
        """:meth:`write` done at once, without waiting for anything (no suspension, so
        nothing can interrupt it), where the backend can (:meth:`Backend.append_now`);
        None having written nothing: the backend cannot now, the events take several
        commits, or a snapshot is due (saving one waits). Then :meth:`write` it."""
        pending = prepared.pending
        if not pending:
            return []
        if not self.appends_now or len(prepared.parts) != 1:
            return None
        if self._snapshot_due(prepared.aggregate, pending[0].originator_version, pending[-1]):
            return None
        ((_, _, commit),) = prepared.parts
        journaled = journaling()  # tests only
        if journaled and not prepared.journaled:
            prepared.journaled = True  # once: write() does not journal it again
            _journal("attempt", commit)
        position = self.backend.append_now(commit)
        if position is None:
            return None
        if journaled:
            _journal("ack", commit)
        self._tell(commit, position, pending)
        log_commit(prepared.aggregate, pending)
        return pending

    def _tell(self, commit: Commit, position: int, events: Sequence[ExecutionEvent]) -> None:
        listener = self.appended
        if listener is not None and not UNCOMMITTED.get():
            listener(commit.stream_id, position, events)

    async def _append(self, commit: Commit, attempted: bool = False) -> int:
        """``attempted``: its attempt is journaled already (tests only)."""
        journaled = journaling()  # tests only: no per-event string work otherwise
        if journaled and not attempted:
            _journal("attempt", commit)
        position = await self.backend.append(commit)
        if journaled:
            _journal("ack", commit)
        return position
