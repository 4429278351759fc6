"""The storage port: what the engine needs from a backend, in bytes and integers.

Adapters implement :class:`Backend`. They know nothing of events' meaning: a stream is a run
of versions 1..n of opaque ``data`` under a ``topic``; a *position* orders every event of
every stream; the work queue is a derived index of runnable executions with leases. Each
backend module (``memory``, ``sqlite``, later ``nats``) implements this one interface and
passes :mod:`stepsource.adapters.contract`.

Times are integers of epoch milliseconds passed in by the caller: adapters read no clock for
decisions, so the engine (and the tests) own time.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Backend",
    "Commit",
    "Lease",
    "NewEvent",
    "QueueUpdate",
    "RecordedEvent",
    "Snapshot",
]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be stored: its stream, its version in that stream, topic and bytes."""

    stream_id: str
    version: int
    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored, with its global ``position`` (strictly increasing in commit order)."""

    stream_id: str
    version: int
    topic: str
    data: bytes
    position: int


@dataclass(frozen=True, slots=True)
class QueueUpdate:
    """A change to the work-queue index, applied in the same transaction as its commit.

    ``enqueue`` makes the stream runnable at ``due_ms`` (inserting or replacing its row and
    clearing any lease); ``done`` removes it from the queue for good.
    """

    kind: Literal["enqueue", "done"]
    step_id: str = ""
    priority: int = 0
    due_ms: int = 0


@dataclass(frozen=True, slots=True)
class Commit:
    """One atomic append to one stream.

    ``expected_version`` is the stream's current last version (0 for a new stream); the
    events carry versions ``expected_version + 1 ...`` consecutively. Either all events and
    the optional queue update are stored, or nothing is and the caller gets
    :class:`~stepsource.errors.VersionConflictError`.
    """

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]
    queue: QueueUpdate | None = None
    lease_owner: str | None = field(default=None)
    """If set, the commit is refused with VersionConflictError unless this worker holds the
    stream's lease (a zombie whose lease was taken over never writes)."""


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


class Backend(abc.ABC):
    """Storage for event streams, the work queue and snapshots.

    Every method may be called before :meth:`open` (it opens lazily) and after
    :meth:`aclose` (it reopens). Driver errors never escape: they become
    :class:`~stepsource.errors.BackendUnavailableError`, :class:`VersionConflictError` or
    :class:`CorruptLogError`.
    """

    #: largest commit in bytes the backend accepts (sum of event data); the engine checks first
    max_commit_bytes: int = 64 * 1024 * 1024

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
        """The earliest ``due_ms`` among queued, unleased streams of these steps (or None)."""

    # -- snapshots (derived, rebuildable) ---------------------------------------------------
    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot, replacing any older one of the same stream."""

    @abc.abstractmethod
    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        """The newest snapshot of the stream with version <= ``max_version`` (if given)."""
