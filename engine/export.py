"""Copy a whole log to another backend, stream by stream, and verify the copy.

The target must be empty. Every stream is copied with its versions unchanged (the stored
bytes as they are: an encrypted log stays encrypted), in the order the streams were created,
so the target's global order keeps each execution's place among the others (positions
themselves are the target's own). Derived data is rebuilt, not copied: each execution that
has not ended gets its work-queue row (runnable as it was: due, retrying at its retry time,
or waiting for its timer or a message) and its pending inbox items; the published
definitions of the steps the executions run are copied (the port lists no others: a step
never started is published again by the first worker that runs it on the target); snapshots
and read models are rebuilt from the log by the target.

Global state (the key-value store) is copied too: every entry live when the copy is made,
with its stored bytes and what is left of its TTL (the target numbers revisions its own way:
the engine's compare-and-set compares values and keeps its writers' marks in the bytes).

The copy is verified before the report is returned: the target holds as many events as were
copied, every stream's last version equals the source's, no stream is missing or extra, and
the target's global state holds the copied entries.
Events appended to the source while the export runs are not copied (the export covers the log
up to the position it saw at the start; the report names it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    NewEvent,
    QueueUpdate,
    RecordedEvent,
    kv_scan_all,
)
from stepsource.aggregates import events as ev
from stepsource.engine.actor import NEVER_MS
from stepsource.engine.store import ExecutionStore
from stepsource.errors import UsageError

__all__ = ["ExportProgress", "ExportReport", "export_log"]

_TERMINAL_TOPICS = frozenset(
    cls.TOPIC for cls in (ev.StepCompleted, ev.StepContinued, ev.StepFailed, ev.StepCancelled)
)
_PAGE = 1000
_MAX_CHUNK_EVENTS = 1000

#: ``progress(events_copied, events_total)``
ExportProgress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ExportReport:
    streams: int
    events: int
    position: int
    open_executions: int
    inbox_items: int
    definitions: int
    seconds: float
    #: global-state entries copied (those live when the copy was made)
    global_entries: int = 0
    #: what verification found wrong (empty: the copy is exact)
    mismatches: tuple[str, ...] = field(default=())

    @property
    def verified(self) -> bool:
        return not self.mismatches


@dataclass(slots=True)
class _Stream:
    stream_id: str
    last_version: int = 0
    events: int = 0
    terminal: bool = False


async def _scan(backend: Backend, until: int) -> dict[str, _Stream]:
    """Every stream up to position ``until``, in the order of their first events."""
    streams: dict[str, _Stream] = {}
    position = 0
    while position < until:
        page = await backend.read_all(position, _PAGE)
        if not page:
            break
        for record in page:
            if record.position > until:
                break
            stream = streams.get(record.stream_id)
            if stream is None:
                stream = streams[record.stream_id] = _Stream(record.stream_id)
            stream.last_version = max(stream.last_version, record.version)
            stream.events += 1
            stream.terminal = stream.terminal or record.topic in _TERMINAL_TOPICS
        position = page[-1].position
    return streams


def _chunks(records: Sequence[RecordedEvent], max_bytes: int) -> list[list[RecordedEvent]]:
    chunks: list[list[RecordedEvent]] = []
    current: list[RecordedEvent] = []
    size = 0
    for record in records:
        if current and (len(current) >= _MAX_CHUNK_EVENTS or size + len(record.data) > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(record)
        size += len(record.data)
    if current:
        chunks.append(current)
    return chunks


def _open_state(store: ExecutionStore, records: Sequence[RecordedEvent]) -> tuple[QueueUpdate, int]:
    """The work-queue row of an execution that has not ended, as its events leave it, and
    the id of the last inbox item it recorded (0: none)."""
    events = store.decode(records)
    first = events[0]
    assert isinstance(first, ev.StepScheduled)
    due = first.due_ms
    last_inbox_id = 0
    for event in events:
        if isinstance(event, ev.AttemptFailed) and event.retry_at_ms is not None:
            due = event.retry_at_ms
        elif isinstance(event, ev.StepSuspended):
            due = NEVER_MS if event.wake_at_ms is None else event.wake_at_ms
        elif isinstance(event, (ev.StepLeased, ev.StepStarted)):
            due = 0  # running when the copy was made: runnable at once (resumed by replay)
        elif isinstance(event, ev.Message):
            last_inbox_id = max(last_inbox_id, event.inbox_id)
    row = QueueUpdate(kind="enqueue", step_id=first.step_id, priority=first.priority, due_ms=due)
    return row, last_inbox_id


async def _pending(source: Backend, stream_id: str, recorded: int) -> list[InboxItem]:
    """The stream's inbox items not recorded yet (all pages; an item at or below the last
    recorded id is in the stream already, its deletion not yet made on some backends)."""
    items: list[InboxItem] = []
    while page := await source.inbox(stream_id, items[-1].id if items else recorded):
        items.extend(page)
    return items


async def export_log(
    store: ExecutionStore,
    target: Backend,
    *,
    progress: ExportProgress | None = None,
    now_ms: int | None = None,
) -> ExportReport:
    """Copy the log behind ``store`` and its global state into the empty ``target`` and
    verify the copy. ``now_ms`` (default: the wall clock) judges which global-state entries
    are live and what is left of their TTLs."""
    started = time.perf_counter()
    source = store.backend
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if await target.max_position() > 0 or await _holds_global_state(target, now):
        raise UsageError(
            "the export target already holds events or global state; export only into an "
            "empty backend",
            hint="Pick a new file (sqlite:///copy.db) or an empty stream",
        )
    until = await source.max_position()
    streams = await _scan(source, until)
    total = sum(s.events for s in streams.values())
    copied = 0
    open_count = 0
    inbox_items = 0
    step_ids: set[str] = set()
    # the items of the executions still open, re-posted once every stream is copied: the
    # target's ids are reserved past every id the copied records hold first
    pending: list[InboxItem] = []
    recorded_ids = 0
    if progress is not None:
        progress(0, total)
    for stream in streams.values():
        records = await source.read_stream(stream.stream_id, 1, stream.last_version)
        queue = None
        if not stream.terminal:
            queue, last_inbox_id = _open_state(store, records)
            recorded_ids = max(recorded_ids, last_inbox_id)
            open_count += 1
        step_ids.add(_step_id(store, records[0]))
        chunks = _chunks(records, target.max_commit_bytes // 2)
        for n, chunk in enumerate(chunks):
            await target.append(
                Commit(
                    stream_id=stream.stream_id,
                    expected_version=chunk[0].version - 1,
                    events=[NewEvent(r.stream_id, r.version, r.topic, r.data) for r in chunk],
                    queue=queue if n == len(chunks) - 1 else None,
                )
            )
            copied += len(chunk)
            if progress is not None:
                progress(copied, total)
        if not stream.terminal:
            pending += await _pending(source, stream.stream_id, last_inbox_id)
    if recorded_ids:
        await target.reserve_inbox_ids(recorded_ids)
    for item in pending:
        await target.post(item.stream_id, item.kind, item.name, item.data, item.posted_ms)
        inbox_items += 1
    definitions = 0
    for step_id in sorted(step_ids):
        published = await source.published_definition(step_id)
        if published is not None:
            await target.publish_definition(step_id, *published)
            definitions += 1
    entries = await kv_scan_all(source, now)
    for entry in entries.values():
        ttl_ms = None if entry.expires_ms is None else entry.expires_ms - now
        await target.kv_put(entry.key, entry.data, now, ttl_ms)
    mismatches = await _verify(target, streams, total)
    mismatches += _verify_global(entries, await kv_scan_all(target, now))
    return ExportReport(
        streams=len(streams),
        events=copied,
        position=until,
        open_executions=open_count,
        inbox_items=inbox_items,
        definitions=definitions,
        seconds=time.perf_counter() - started,
        mismatches=tuple(mismatches),
        global_entries=len(entries),
    )


def _step_id(store: ExecutionStore, first: RecordedEvent) -> str:
    event = store.codec.decode(first)
    assert isinstance(event, ev.StepScheduled)
    return event.step_id


async def _verify(target: Backend, streams: dict[str, _Stream], total: int) -> list[str]:
    """Counts and per-stream last versions of the target against the source's."""
    copied = await _scan(target, await target.max_position())
    found = sum(s.events for s in copied.values())
    problems: list[str] = []
    if found != total:
        problems.append(f"the target holds {found} events, the source {total}")
    for stream_id in sorted(streams.keys() - copied.keys()):
        problems.append(f"stream {stream_id} is missing from the target")
    for stream_id in sorted(copied.keys() - streams.keys()):
        problems.append(f"stream {stream_id} is in the target but not in the source")
    for stream_id in sorted(streams.keys() & copied.keys()):
        want, got = streams[stream_id], copied[stream_id]
        if (want.last_version, want.events) != (got.last_version, got.events):
            problems.append(
                f"stream {stream_id}: the source has versions 1..{want.last_version} "
                f"({want.events} events), the target 1..{got.last_version} ({got.events})"
            )
    return problems


async def _holds_global_state(target: Backend, now_ms: int) -> bool:
    """Whether ``target`` has a live key-value entry (a page may be empty before the last:
    Redis ``SCAN``, an expired entry first in a NATS bucket)."""
    cursor = ""
    while True:
        page, cursor = await target.kv_scan(now_ms, cursor, 100)
        if page:
            return True
        if not cursor:
            return False


def _verify_global(copied: dict[str, KVEntry], found: dict[str, KVEntry]) -> list[str]:
    """The target's global state against the entries copied (data and expiry; revisions are
    the target's own)."""
    problems = [
        f"global-state key {key!r} is missing from the target"
        for key in copied.keys() - found.keys()
    ]
    problems += [
        f"global-state key {key!r} is in the target but was not copied"
        for key in found.keys() - copied.keys()
    ]
    for key in sorted(copied.keys() & found.keys()):
        want, got = copied[key], found[key]
        if (want.data, want.expires_ms) != (got.data, got.expires_ms):
            problems.append(f"global-state key {key!r} differs on the target")
    return sorted(problems)
