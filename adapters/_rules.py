"""The rules every backend applies, kept in one place so that all backends agree.

:func:`check_commit` and :func:`check_post` refuse malformed requests before anything is
written (the caller's bug, not a race); :func:`version_conflict` and :func:`lease_conflict`
build the errors for a refused commit, so all backends word them alike; :func:`queued_due_ms`
and :func:`wake_ms` are the work queue's time rules (a backend that computes them in its own
query language mirrors them exactly).
"""

from __future__ import annotations

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.errors import LimitExceededError, UsageError, VersionConflictError

__all__ = [
    "QUEUE_KINDS",
    "check_commit",
    "check_post",
    "lease_conflict",
    "queued_due_ms",
    "version_conflict",
    "wake_ms",
]

#: the kinds of :class:`~stepsource.adapters.ports.QueueUpdate`
QUEUE_KINDS = frozenset({"enqueue", "done", "suspend"})
_INT64 = range(-(2**63), 2**63)  # what every backend can store (SQLite INTEGER)


def _check_int(what: str, value: object, stream_id: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT64:
        raise UsageError(
            f"{what} must be an int of 64 bits, not {value!r}",
            execution_id=stream_id,
        )


def check_commit(commit: Commit, max_commit_bytes: int) -> None:
    """Refuse a malformed commit before anything is written (the caller's bug, not a race).

    Its events must belong to its stream and carry versions ``expected_version + 1 ...``
    consecutively; their data must fit ``max_commit_bytes``; its queue update must be of a
    known kind with 64-bit integers, and its consumed inbox ids 64-bit integers.
    """
    if commit.expected_version < 0:
        raise UsageError(
            f"expected_version must be 0 or more, not {commit.expected_version}",
            execution_id=commit.stream_id,
        )
    size = 0
    for index, event in enumerate(commit.events):
        if event.stream_id != commit.stream_id:
            raise UsageError(
                f"an event of stream {event.stream_id!r} is in a commit of another stream",
                execution_id=commit.stream_id,
                hint="a commit appends to exactly one stream",
            )
        wanted = commit.expected_version + 1 + index
        if event.version != wanted:
            raise UsageError(
                f"event {index} of the commit has version {event.version}, expected {wanted}",
                execution_id=commit.stream_id,
                hint="a commit's events carry versions expected_version + 1, + 2, ... in order",
            )
        size += len(event.data)
    if size > max_commit_bytes:
        raise LimitExceededError(
            f"the commit holds {size} bytes of event data, more than this backend's "
            f"limit of {max_commit_bytes}",
            execution_id=commit.stream_id,
            hint="split the work into smaller commits or store large payloads elsewhere",
        )
    update = commit.queue
    if update is not None:
        if update.kind not in QUEUE_KINDS:
            raise UsageError(
                f"unknown queue update kind {update.kind!r}",
                execution_id=commit.stream_id,
                hint=f"use one of {', '.join(sorted(QUEUE_KINDS))}",
            )
        _check_int("a queue update's priority", update.priority, commit.stream_id)
        _check_int("a queue update's due_ms", update.due_ms, commit.stream_id)
        _check_int("a queue update's now_ms", update.now_ms, commit.stream_id)
    for item_id in commit.consumed:
        _check_int("a consumed inbox id", item_id, commit.stream_id)


def check_post(stream_id: str, data: bytes, now_ms: int, max_commit_bytes: int) -> None:
    """Refuse an inbox item that could never be stored or moved into its stream."""
    _check_int("now_ms", now_ms, stream_id)
    if len(data) > max_commit_bytes:
        raise LimitExceededError(
            f"the inbox item holds {len(data)} bytes, more than this backend's limit of "
            f"{max_commit_bytes}",
            execution_id=stream_id,
            hint="store large payloads elsewhere and post a reference to them",
        )


def version_conflict(commit: Commit, current_version: int) -> VersionConflictError:
    """The error for a commit whose expected version is not the stream's last version."""
    return VersionConflictError(
        f"the commit expected version {commit.expected_version} but the stream is at "
        f"version {current_version}; nothing was written",
        execution_id=commit.stream_id,
        hint="another writer appended first: stop this actor, or reload the stream and retry",
    )


def lease_conflict(commit: Commit, holder: str | None) -> VersionConflictError:
    """The error for a commit made by a worker that does not hold the stream's lease."""
    held = f"is held by {holder!r}" if holder is not None else "is held by no worker"
    return VersionConflictError(
        f"worker {commit.lease_owner!r} may not append: the lease {held}; nothing was written",
        execution_id=commit.stream_id,
        hint="another worker took the execution over: stop this actor without writing",
    )


def queued_due_ms(update: QueueUpdate, inbox_pending: bool) -> int:
    """The ``due_ms`` of the queue row an ``enqueue`` or ``suspend`` update writes.

    ``inbox_pending`` says whether the stream has inbox items once the commit's consumed ones
    are deleted: a ``suspend`` with items pending is due at once (``min(due_ms, now_ms)``).
    """
    if update.kind == "suspend" and inbox_pending:
        return min(update.due_ms, update.now_ms)
    return update.due_ms


def wake_ms(due_ms: int, lease_owner: str | None, lease_expires_ms: int) -> int:
    """The earliest time a queue row may be leased: its due time, and for a leased row not
    before its lease expires (a lease is taken over once ``expires_ms < now_ms``)."""
    if lease_owner is None:
        return due_ms
    return max(due_ms, lease_expires_ms + 1)
