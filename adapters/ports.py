"""The storage port: what the engine needs from a backend, in bytes and integers.

Adapters implement :class:`Backend`. They know nothing of events' meaning: a stream is a run
of versions 1..n of opaque ``data`` under a ``topic``; a *position* orders every event of
every stream; the work queue is a derived index of runnable executions with leases. Each
backend (the ``memory`` module, the ``sqlite`` and ``nats`` packages) implements this one
interface and passes :mod:`stepsource.adapters.contract`.

Clients never write a stream: they :meth:`~Backend.post` to its *inbox*, and the actor holding
the stream's lease moves the items into the stream as events, deleting them in the same commit
(:attr:`Commit.consumed`). Workers publish the step definitions they run
(:meth:`~Backend.publish_definition`) so a client without the step can validate against them.

Beside the log each backend keeps one global key-value store (:meth:`~Backend.kv_get`,
:meth:`~Backend.kv_put`, :meth:`~Backend.kv_compare_and_set`, :meth:`~Backend.kv_delete`):
global-scope state, with optional TTL and compare-and-set on a per-key revision. It is the one
thing not kept in the streams; the engine records a handler's reads of it in the handler's
stream so a replay sees the same values.

Times are integers of epoch milliseconds passed in by the caller: adapters read no clock for
decisions, so the engine (and the tests) own time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stepsource.errors import UsageError

__all__ = [
    "UNREADABLE_TOPIC",
    "Backend",
    "Commit",
    "InboxItem",
    "KVEntry",
    "Lease",
    "NewEvent",
    "Outgoing",
    "QueueUpdate",
    "ReadModelRow",
    "ReadModelStore",
    "ReadModelTable",
    "RecordedEvent",
    "Snapshot",
    "appends_now",
    "kv_scan_all",
]

#: The topic a backend gives a stored record it cannot read as a commit of stepsource's (a
#: message another program put among the log's subjects, say) when it reads the whole log:
#: the record stands where the message stands, its data says what is wrong, and decoding it
#: raises, so the execution it names is quarantined while the rest of the log is read.
UNREADABLE_TOPIC = "stepsource:!unreadable"


class NewEvent(NamedTuple):
    """An event about to be stored: its stream, its version in that stream, topic and bytes.

    A named tuple, as :class:`RecordedEvent` is: the engine makes one per event it commits."""

    stream_id: str
    version: int
    topic: str
    data: bytes


class RecordedEvent(NamedTuple):
    """An event as stored, with its global ``position`` (strictly increasing in commit order).

    A named tuple rather than a frozen dataclass: reads make one per stored event (a replay
    of 10,000 events, a rebuild of millions), and a row whose columns come in this order
    becomes one with ``RecordedEvent._make(row)`` in about a third of a frozen dataclass's
    ``__init__``, which sets each field through ``object.__setattr__``."""

    stream_id: str
    version: int
    topic: str
    data: bytes
    position: int


@dataclass(frozen=True, slots=True)
class QueueUpdate:
    """A change to the work-queue index, applied in the same transaction as its commit.

    ``enqueue`` makes the stream runnable at ``due_ms`` (inserting or replacing its row and
    clearing any lease); ``done`` removes it from the queue for good. ``suspend`` is
    ``enqueue`` for an actor that goes to sleep: if the stream still has inbox items once the
    commit's :attr:`~Commit.consumed` ones are deleted, the row is due at
    ``min(due_ms, now_ms)`` instead, so an item posted just before the suspend is not missed.
    ``now_ms`` (the caller's clock; adapters read none) is used by ``suspend`` only.

    ``lease`` is ``enqueue`` with the row already leased to ``owner`` until
    ``lease_expires_ms``: a worker starting an execution it runs itself at once (the local
    start of :mod:`stepsource.engine.starting`) schedules and leases it in one commit. Only
    backends whose :attr:`Backend.leases_in_commit` is true accept it.
    """

    kind: Literal["enqueue", "done", "suspend", "lease"]
    step_id: str = ""
    priority: int = 0
    due_ms: int = 0
    now_ms: int = 0
    owner: str = ""
    lease_expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An inbox item a commit posts to another stream (as :meth:`Backend.post` would),
    stored in the same transaction as the commit's events where the backend can."""

    stream_id: str
    kind: str
    name: str
    data: bytes
    now_ms: int


@dataclass(frozen=True, slots=True)
class Commit:
    """One atomic append to one stream.

    ``expected_version`` is the stream's current last version (0 for a new stream); the
    events carry versions ``expected_version + 1 ...`` consecutively. Either all events, the
    deletion of the ``consumed`` inbox items and the optional queue update are stored, or
    nothing is and the caller gets :class:`~stepsource.errors.VersionConflictError`.
    """

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]
    queue: QueueUpdate | None = None
    lease_owner: str | None = field(default=None)
    """If set, the commit is refused with VersionConflictError unless this worker holds the
    stream's lease (a zombie whose lease was taken over never writes)."""
    consumed: Sequence[int] = ()
    outbox: Sequence[Outgoing] = ()
    """Inbox items for other streams (a child's completion nudging its parent), posted
    atomically with the events on SQLite and memory, right after them on NATS."""
    """Ids of this stream's inbox items to delete with the commit (exactly once: a refused
    commit leaves them). An id no longer there, or of another stream's item, is skipped."""


@dataclass(frozen=True, slots=True)
class InboxItem:
    """A client's request to an execution, waiting for its actor to move it into the stream.

    ``id`` is assigned by the backend, strictly increasing in posting order (per backend);
    ``kind``, ``name`` and ``data`` are opaque to adapters.
    """

    id: int
    stream_id: str
    kind: str
    name: str
    data: bytes
    posted_ms: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A runnable execution leased to a worker until ``expires_ms``."""

    stream_id: str
    step_id: str
    priority: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A serialized aggregate state at ``version`` of ``stream_id``."""

    stream_id: str
    version: int
    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class KVEntry:
    """One live entry of the global key-value store.

    ``data`` is opaque (the engine stores JSON). ``revision`` is > 0 and strictly increases
    with every write of the key, also across its deletion or expiry (a key written again never
    gets back a revision it had before), so a compare-and-set on a stale revision always
    fails. Revisions of different keys are not comparable: a backend may number them per key
    or from one counter (memory and SQLite: one counter per store; JetStream: the stream
    sequence). ``expires_ms`` is when the entry stops existing (absent once
    ``expires_ms <= now_ms``), or None if it never expires.
    """

    key: str
    data: bytes
    revision: int
    expires_ms: int | None


#: one row of a read model, in its table's column order
ReadModelRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ReadModelTable:
    """A read model's table as a backend stores it (the engine says what it holds).

    ``columns`` are ``(name, kind)`` pairs in row order, ``kind`` one of ``text``, ``int``,
    ``text?``, ``int?`` (``?``: nullable); the first column is the key, ``order`` names the
    unique integer column rows are paged by, ``indexes`` the column lists to index. A table
    of another ``version`` is dropped and rebuilt from the log.
    """

    name: str
    version: int
    columns: tuple[tuple[str, str], ...]
    order: str
    indexes: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)


class ReadModelStore(abc.ABC):
    """A read model's rows and its *tracking position* (the log position the rows reflect)
    in the backend's own database, where every process reads the same rows.

    Methods are synchronous (the engine calls them from worker threads). :meth:`apply`
    writes a batch's rows and advances the tracking position in one transaction, and only
    if the position is still the one the batch was read after, so a batch is applied
    exactly once whatever the number of processes following the log.
    """

    #: what messages name (where the rows are, never a password)
    where: str = ""

    @abc.abstractmethod
    def position(self) -> int:
        """The tracking position (0 before any batch)."""

    @abc.abstractmethod
    def origin(self) -> str | None:
        """The stream id of the first event of the log the rows were folded from."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Delete every row and set the tracking position to 0 (one transaction)."""

    @abc.abstractmethod
    def apply(
        self,
        after: int,
        last: int,
        keys: Sequence[str],
        fold: Callable[[list[ReadModelRow]], Sequence[ReadModelRow]],
        origin: str | None,
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        """In one transaction: if the tracking position is ``after``, read the rows of
        ``keys``, write the rows ``fold(rows)`` returns (replacing those with the same key),
        record ``origin`` (when not None) and set the position to ``last``, then call
        ``before_commit`` and commit; False, and nothing written, if the position is not
        ``after``."""

    @abc.abstractmethod
    def select(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        cursor: str | None,
        limit: int,
        offset: int,
    ) -> list[ReadModelRow] | None:
        """Rows whose columns equal ``equals`` and are >= ``at_least``, highest ``order``
        first, after the row keyed ``cursor`` (None if there is no such row)."""

    @abc.abstractmethod
    def tally(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        by: str,
        bucket: tuple[int, int, int] | None = None,
    ) -> dict[Any, int]:
        """How many rows whose columns equal ``equals`` and are >= ``at_least`` have each
        value of the column ``by`` (rows where it is null left out), counted by the database,
        never by reading the rows; with ``bucket=(start, width, count)`` (an integer column),
        per bucket ``min((value - start) // width, count - 1)`` of the values >= ``start``
        instead of per value (buckets with no row left out)."""

    @abc.abstractmethod
    def bounds(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
    ) -> tuple[Any, Any] | None:
        """The lowest and the highest non-null value of ``column`` among the rows whose
        columns equal ``equals`` and are >= ``at_least`` (None if there is none)."""

    @abc.abstractmethod
    def replace(self, key: str, update: Callable[[ReadModelRow], ReadModelRow]) -> None:
        """Write ``update(row)`` over the row keyed ``key``, if there is one."""

    @abc.abstractmethod
    def count(self) -> int:
        """The number of rows."""

    @abc.abstractmethod
    def dump(self) -> list[ReadModelRow]:
        """Every row, lowest ``order`` first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (the next call opens one again)."""


class Backend(abc.ABC):
    """Storage for event streams, inboxes, the work queue, step definitions and snapshots.

    Every method may be called before :meth:`open` (it opens lazily) and after
    :meth:`aclose` (it reopens). Driver errors never escape: they become
    :class:`~stepsource.errors.BackendUnavailableError`, :class:`VersionConflictError` or
    :class:`CorruptLogError`.
    """

    #: largest commit in bytes the backend accepts (sum of event data), and largest inbox
    #: item; the engine checks first
    max_commit_bytes: int = 64 * 1024 * 1024

    #: whether a commit's queue update may be of kind ``lease`` (see :class:`QueueUpdate`)
    leases_in_commit: bool = False

    #: whether positions count events: the log's end minus a position is about the number
    #: of events after it (gaps are rare), so a catch-up can size its work and split the log
    #: into ranges of positions by it (NATS numbers a commit's events inside its message's
    #: sequence, leaving most positions unused: False). A backend that says True also
    #: promises that a commit's events take consecutive positions ending at the one
    #: :meth:`append` returns: the engine then folds its own commits into the executions
    #: index by those positions without reading them back (``engine/index_feed.py``)
    dense_positions: bool = False

    def readmodel_path(self) -> str | None:
        """Where the engine keeps this backend's read models: a local SQLite file, or None
        for an in-memory index caught up from the log when the engine starts (memory://, a
        NATS cluster: never a file in the working directory)."""
        return None

    def joined_transaction(self, what: str) -> AbstractAsyncContextManager[Any] | None:
        """A transaction of the backend's database handed to user code (its connection is
        what the block receives) that this task's appends join, committed at the end of the
        block; None where the backend has none (only PostgreSQL has)."""
        return None

    def readmodel_store(self, table: ReadModelTable) -> ReadModelStore | None:
        """Where the backend keeps a read model in its own database (PostgreSQL), or None:
        the engine keeps it in a local SQLite database (:meth:`readmodel_path`)."""
        return None

    async def watch(
        self,
        on_work: Callable[[], None],
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
    ) -> None:
        """Tell of changes made by any process, until cancelled: ``on_work()`` when an
        execution may have become runnable (queued, woken by an inbox item, released),
        ``on_change(execution_id)`` when an execution's stream changed. Signals
        ``task_status.started()`` once listening.

        Best effort: the engine polls as well, so a lost notice costs latency, never
        correctness. The default signals started and returns (the engine polls only); the
        Redis backend listens to the server (pub/sub), PostgreSQL to ``LISTEN/NOTIFY`` (which
        names no execution: it calls ``on_change("")``, waking every waiting handle).
        """
        task_status.started()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create tables/streams if missing. Idempotent."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections. The backend stays usable: the next call reopens it."""

    # -- the log ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def append(self, commit: Commit) -> int:
        """Store one commit atomically; return the position of its last event.

        Concurrent calls from many tasks share transactions (group commit): one caller's
        conflict never fails another caller's commit.
        """

    def append_now(self, commit: Commit) -> int | None:
        """Store one commit at once, in the calling thread and without waiting for anything
        (no other commit in flight, the storage free now), as :meth:`append` would; or
        return None having done nothing (the caller then awaits :meth:`append`). Raises as
        :meth:`append` does. Nothing can cancel a call that never suspends, so the engine
        saves the shielded scope an awaited commit needs. The default always returns None.

        A subclass that overrides :meth:`append` without overriding this keeps None: the
        engine calls it only where :func:`appends_now` says so.
        """
        return None

    @abc.abstractmethod
    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        """Events of one stream with ``from_version <= version <= to_version``, in order."""

    @abc.abstractmethod
    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events of all streams with position > ``after_position``, in order."""

    @abc.abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """The last version of the stream, 0 if it has no events."""

    @abc.abstractmethod
    async def max_position(self) -> int:
        """The position of the last stored event, 0 if the log is empty."""

    # -- the work queue (derived, rebuildable) ----------------------------------------------
    @abc.abstractmethod
    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        """Lease up to ``limit`` runnable streams whose step id is in ``step_ids``.

        Runnable means queued, ``due_ms <= now_ms`` and not leased (or its lease expired
        before ``now_ms``). Highest priority first, then earliest due. Atomic across
        processes: one stream is never leased to two workers at once.
        """

    @abc.abstractmethod
    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        """Extend the worker's leases; return the stream ids it still holds."""

    @abc.abstractmethod
    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        """Give the lease back (if held); ``due_ms`` reschedules the stream when given."""

    @abc.abstractmethod
    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        """The earliest time a queued stream of these steps may be leased (or None).

        That is ``due_ms`` for an unleased row and ``max(due_ms, lease_expires_ms + 1)`` for a
        leased one (when its lease, if not renewed, may be taken over).
        """

    async def queue_depth(self, step_ids: Sequence[str], now_ms: int) -> int | None:
        """How many queued streams of these steps are runnable at ``now_ms`` (due, and not
        leased or their lease expired): the work waiting for a worker. None where a backend
        does not count it (the engine then reports no queue depth)."""
        return None

    # -- the inbox --------------------------------------------------------------------------
    @abc.abstractmethod
    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        """Store an inbox item for the stream and return its id.

        In the same transaction, a queue row of the stream due later than ``now_ms`` becomes
        due at ``now_ms``, so a suspended execution is runnable at once (a leased row keeps its
        lease: its holder reads the inbox). Without a queue row the item is stored anyway.
        Refuses (LimitExceededError) data larger than :attr:`max_commit_bytes`.
        """

    @abc.abstractmethod
    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        """Up to ``limit`` of the stream's inbox items with ``id > after_id``, in id order."""

    @abc.abstractmethod
    async def reserve_inbox_ids(self, above: int) -> None:
        """Make every inbox id handed out from now on greater than ``above``. For an
        export's target, whose copied streams record the source's inbox ids: an item whose id
        is not above an execution's last recorded one is taken for one it already recorded.
        Called while the inboxes hold no item (an export's target before it posts any)."""

    # -- published step definitions (derived, rebuildable) ----------------------------------
    @abc.abstractmethod
    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        """Store a step's definition (opaque JSON bytes), replacing any other of that step."""

    @abc.abstractmethod
    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        """The published ``(version, data)`` of the step, or None."""

    # -- snapshots (derived, rebuildable) ---------------------------------------------------
    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot, replacing any older one of the same stream."""

    @abc.abstractmethod
    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The newest snapshot of the stream with version <= ``max_version`` (if given)."""

    # -- the global key-value store ---------------------------------------------------------
    # Not abstract: a backend without it stays instantiable and refuses these calls.
    # Keys, data, times and TTLs are checked by :mod:`stepsource.adapters._rules` (UsageError,
    # LimitExceededError) before anything is written. An entry whose ``expires_ms <= now_ms``
    # is absent for every method; a backend may purge it at any write with such a ``now_ms``.
    def _no_kv(self) -> UsageError:
        return UsageError(
            f"{type(self).__name__} has no global key-value store yet",
            hint="Use the memory://, sqlite:/// or nats:// backend for global-scope state",
        )

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        """The key's live entry at ``now_ms``, or None if it is absent or expired."""
        raise self._no_kv()

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        """Write the key unconditionally and return the new entry.

        ``ttl_ms`` (> 0) makes it expire at ``now_ms + ttl_ms``; None means never (a put
        without TTL over an entry with one removes the expiry).
        """
        raise self._no_kv()

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        """Write the key only if its live revision at ``now_ms`` is ``expected_revision``
        (None: only if it is absent or expired); return the new entry, or None if refused
        (then nothing was written). Atomic across tasks, threads and processes.
        """
        raise self._no_kv()

    async def kv_delete(self, key: str, now_ms: int) -> None:
        """Remove the key (nothing happens if it is absent). Its next write still gets a
        revision above every one it had."""
        raise self._no_kv()

    async def kv_scan(
        self, now_ms: int, cursor: str = "", limit: int = 1000
    ) -> tuple[list[KVEntry], str]:
        """A page of the entries live at ``now_ms``, and the cursor that reads the next page
        ("" once there is none); ``cursor=""`` starts a scan. ``limit`` is the page size
        asked for: a backend whose server pages by its own measure (Redis ``SCAN``) may hand
        out a few more, or fewer, even none before the last page.

        Pages come in no promised order. Every key live and unwritten throughout a scan is in
        one of its pages; a key written meanwhile may be missing or come twice (the later is
        the newer). For copying the store (``stepsource export``), not for hot paths.
        """
        raise self._no_kv()


def appends_now(backend: Backend) -> bool:
    """Whether ``backend``'s :meth:`~Backend.append_now` may write: it is defined by the
    class that defines its :meth:`~Backend.append`, or by a subclass of it (a subclass that
    overrides ``append`` alone, to hook or fail appends, keeps every commit on its
    ``append``)."""
    cls = type(backend)
    now = next(c for c in cls.__mro__ if "append_now" in c.__dict__)
    append = next(c for c in cls.__mro__ if "append" in c.__dict__)
    return now is not Backend and issubclass(now, append)


async def kv_scan_all(backend: Backend, now_ms: int, limit: int = 1000) -> dict[str, KVEntry]:
    """Every entry live at ``now_ms``, by key, read page by page (a key met twice keeps the
    later page's entry)."""
    entries: dict[str, KVEntry] = {}
    cursor = ""
    while True:
        page, cursor = await backend.kv_scan(now_ms, cursor, limit)
        entries.update((entry.key, entry) for entry in page)
        if not cursor:
            return entries
