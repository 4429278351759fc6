"""The rules every backend applies, kept in one place so that all backends agree.

:func:`check_commit` and :func:`check_post` refuse malformed requests before anything is
written (the caller's bug, not a race); :func:`version_conflict` and :func:`lease_conflict`
build the errors for a refused commit, so all backends word them alike; :func:`queued_due_ms`
and :func:`wake_ms` are the work queue's time rules (a backend that computes them in its own
query language mirrors them exactly). :func:`check_kv_key`, :func:`check_kv_write` and
:func:`kv_live` are the global key-value store's (keys, sizes, TTLs, expiry).
"""

from __future__ import annotations

from stepsource.adapters.ports import Commit, QueueUpdate
from stepsource.errors import LimitExceededError, UsageError, VersionConflictError

__all__ = [
    "KV_MAX_KEY_LENGTH",
    "QUEUE_KINDS",
    "check_commit",
    "check_kv_key",
    "check_kv_write",
    "check_post",
    "kv_expires_ms",
    "kv_live",
    "lease_conflict",
    "queued_due_ms",
    "version_conflict",
    "wake_ms",
]

#: the kinds of :class:`~stepsource.adapters.ports.QueueUpdate`
QUEUE_KINDS = frozenset({"enqueue", "done", "suspend", "lease"})
_INT64 = range(-(2**63), 2**63)  # what every backend can store (SQLite INTEGER)


def _check_int(what: str, value: object, stream_id: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT64:
        raise UsageError(
            f"{what} must be an int of 64 bits, not {value!r}",
            execution_id=stream_id,
        )


#: the longest key of the global key-value store, in characters
KV_MAX_KEY_LENGTH = 512


def _kv_int(what: str, value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT64:
        raise UsageError(
            f"{what} of key-value key {key!r} must be an int of 64 bits, not {value!r}"
        )
    return value


def _kv_key(key: object) -> str:
    if not isinstance(key, str):
        raise UsageError(
            f"a key-value key must be a str, not {type(key).__name__} {key!r}",
            hint="Use a str key such as 'rate-limit:api'",
        )
    if not key or len(key) > KV_MAX_KEY_LENGTH:
        raise UsageError(
            f"a key-value key must be 1 to {KV_MAX_KEY_LENGTH} characters long, not "
            f"{len(key)} ({key[:40]!r}{'...' if len(key) > 40 else ''})",
            hint="Hash long keys, or keep the long part in the value",
        )
    if "\x00" in key:
        raise UsageError(f"a key-value key may not contain NUL, as {key!r} does")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"the key-value key {key!r} is not valid Unicode text (it has a lone surrogate)"
        ) from None
    return key


def check_kv_key(key: object, now_ms: object) -> None:
    """Refuse a key the global key-value store cannot hold, and a ``now_ms`` out of range.

    A key is a non-empty ``str`` of at most :data:`KV_MAX_KEY_LENGTH` characters, without NUL
    and encodable as UTF-8 (no lone surrogates): every backend can store it as it is (one
    whose own key syntax is narrower encodes it).
    """
    _kv_int("now_ms", now_ms, _kv_key(key))


def check_kv_write(
    key: object,
    data: object,
    now_ms: object,
    ttl_ms: object,
    max_commit_bytes: int,
    expected_revision: object = None,
) -> None:
    """Refuse a put or compare-and-set that could never be stored, before anything is written.

    Besides the key and ``now_ms`` (:func:`check_kv_key`): ``data`` is bytes of at most
    ``max_commit_bytes`` (else LimitExceededError), ``ttl_ms`` is None or an int > 0 with
    ``now_ms + ttl_ms`` within 64 bits, and ``expected_revision`` is None or an int > 0 of 64
    bits. Everything else is a UsageError.
    """
    name = _kv_key(key)
    now = _kv_int("now_ms", now_ms, name)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError(
            f"the value of key-value key {name!r} must be bytes, not {type(data).__name__}"
        )
    size = memoryview(data).nbytes
    if size > max_commit_bytes:
        raise LimitExceededError(
            f"the value of key-value key {name!r} holds {size} bytes, more than this "
            f"backend's limit of {max_commit_bytes}",
            hint="Store large payloads elsewhere and keep a reference to them",
        )
    if ttl_ms is not None:
        ttl = _kv_int("ttl_ms", ttl_ms, name)
        if ttl <= 0:
            raise UsageError(
                f"ttl_ms of key-value key {name!r} must be more than 0, not {ttl}",
                hint="Pass ttl_ms=None for an entry that never expires, or delete the key",
            )
        if now + ttl not in _INT64:
            raise UsageError(
                f"ttl_ms {ttl} of key-value key {name!r} expires beyond 64 bits of "
                f"milliseconds from now_ms {now}",
                hint="Pass ttl_ms=None for an entry that never expires",
            )
    if expected_revision is not None and _kv_int("expected_revision", expected_revision, name) <= 0:
        raise UsageError(
            f"expected_revision of key-value key {name!r} must be more than 0, "
            f"not {expected_revision}",
            hint="Revisions start at 1; pass None to write only if the key is absent",
        )


def check_kv_scan(now_ms: object, limit: object) -> None:
    """Refuse a scan of the key-value store with a ``limit`` below 1 or a ``now_ms`` out of
    range."""
    for what, value, low in (("now_ms", now_ms, _INT64.start), ("limit", limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
            raise UsageError(
                f"{what} of a key-value scan must be an int of 64 bits from {low}, not {value!r}",
                hint="Pass the time in epoch milliseconds and a page size such as 1000",
            )


def kv_expires_ms(now_ms: int, ttl_ms: int | None) -> int | None:
    """When an entry written at ``now_ms`` with ``ttl_ms`` expires (None: never)."""
    return None if ttl_ms is None else now_ms + ttl_ms


def kv_live(expires_ms: int | None, now_ms: int) -> bool:
    """Whether an entry is present at ``now_ms``: it is absent once ``expires_ms <= now_ms``."""
    return expires_ms is None or expires_ms > now_ms


def check_commit(commit: Commit, max_commit_bytes: int, *, leases: bool = False) -> None:
    """Refuse a malformed commit before anything is written (the caller's bug, not a race).

    Its events must belong to its stream and carry versions ``expected_version + 1 ...``
    consecutively; their data must fit ``max_commit_bytes``; its queue update must be of a
    known kind with 64-bit integers (``lease`` only where the backend has ``leases`` in
    commits), and its consumed inbox ids 64-bit integers.
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
                hint="A commit appends to exactly one stream",
            )
        wanted = commit.expected_version + 1 + index
        if event.version != wanted:
            raise UsageError(
                f"event {index} of the commit has version {event.version}, expected {wanted}",
                execution_id=commit.stream_id,
                hint="A commit's events carry versions expected_version + 1, + 2, ... in order",
            )
        size += len(event.data)
    if size > max_commit_bytes:
        raise LimitExceededError(
            f"the commit holds {size} bytes of event data, more than this backend's "
            f"limit of {max_commit_bytes}",
            execution_id=commit.stream_id,
            hint="Split the work into smaller commits or store large payloads elsewhere",
        )
    update = commit.queue
    if update is not None:
        if update.kind not in QUEUE_KINDS:
            raise UsageError(
                f"unknown queue update kind {update.kind!r}",
                execution_id=commit.stream_id,
                hint=f"Use one of {', '.join(sorted(QUEUE_KINDS))}",
            )
        _check_int("a queue update's priority", update.priority, commit.stream_id)
        _check_int("a queue update's due_ms", update.due_ms, commit.stream_id)
        _check_int("a queue update's now_ms", update.now_ms, commit.stream_id)
        if update.kind == "lease" and not leases:
            raise UsageError(
                "this backend cannot lease an execution in a commit (QueueUpdate kind 'lease')",
                execution_id=commit.stream_id,
                hint="Enqueue it, then lease it (check Backend.leases_in_commit first)",
            )
        if update.kind == "lease":
            _check_int(
                "a queue update's lease_expires_ms", update.lease_expires_ms, commit.stream_id
            )
            if not isinstance(update.owner, str) or not update.owner:
                raise UsageError(
                    "a queue update of kind 'lease' needs its owner (a worker id)",
                    execution_id=commit.stream_id,
                    hint="Pass QueueUpdate(kind='lease', owner=worker_id, ...)",
                )
    for item_id in commit.consumed:
        _check_int("a consumed inbox id", item_id, commit.stream_id)
    for outgoing in commit.outbox:
        check_post(outgoing.stream_id, outgoing.data, outgoing.now_ms, max_commit_bytes)


def check_post(stream_id: str, data: bytes, now_ms: int, max_commit_bytes: int) -> None:
    """Refuse an inbox item that could never be stored or moved into its stream."""
    _check_int("now_ms", now_ms, stream_id)
    if len(data) > max_commit_bytes:
        raise LimitExceededError(
            f"the inbox item holds {len(data)} bytes, more than this backend's limit of "
            f"{max_commit_bytes}",
            execution_id=stream_id,
            hint="Store large payloads elsewhere and post a reference to them",
        )


def version_conflict(commit: Commit, current_version: int) -> VersionConflictError:
    """The error for a commit whose expected version is not the stream's last version."""
    return VersionConflictError(
        f"the commit expected version {commit.expected_version} but the stream is at "
        f"version {current_version}; nothing was written",
        execution_id=commit.stream_id,
        hint="Another writer appended first: stop this actor, or reload the stream and retry",
    )


def lease_conflict(commit: Commit, holder: str | None) -> VersionConflictError:
    """The error for a commit made by a worker that does not hold the stream's lease."""
    held = f"is held by {holder!r}" if holder is not None else "is held by no worker"
    return VersionConflictError(
        f"worker {commit.lease_owner!r} may not append: the lease {held}; nothing was written",
        execution_id=commit.stream_id,
        hint="Another worker took the execution over: stop this actor without writing",
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
