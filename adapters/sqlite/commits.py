"""Writing a group commit's commits inside its one SQLite transaction (the writer thread).

:func:`apply_commits` checks and writes the commits of one batch. A batch of distinct
streams takes the set path: one statement reads every stream's last version, last position
and lease holder (index seeks, in chunks), the commits whose checks pass insert all their
events in one ``executemany`` (their positions are consecutive: the transaction holds the
write lock and ``position`` is the rowid of a table nothing is deleted from), then each
applies its inbox, outbox and queue changes. A refused commit writes nothing and gets its
VersionConflictError; the others are not affected. A batch naming a stream twice, or one
whose inserts are refused anyway, takes the commit-by-commit path: each commit under its own
SAVEPOINT (none for a lone commit, whose conflict rolls the whole transaction back through
:class:`Refused`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from stepsource.adapters._rules import lease_conflict, queued_due_ms, version_conflict
from stepsource.adapters.ports import Commit
from stepsource.errors import VersionConflictError

__all__ = ["Refused", "apply_commits", "has_inbox", "post_in", "stream_version"]

Outcome = int | VersionConflictError

# the streams of a set of commits as one JSON array parameter: one statement whatever their
# number (a VALUES list of N rows is a statement per N, and SQLite's statement cache keeps up
# to 128 of them per connection, several MB resident in a worker)
_HEADS = (
    "WITH s(id) AS (SELECT value FROM json_each(?)) SELECT s.id, "
    "(SELECT version FROM events WHERE stream_id = s.id ORDER BY version DESC LIMIT 1), "
    "(SELECT lease_owner FROM queue WHERE stream_id = s.id) FROM s"
)
# one stream's last version and position and its lease holder, in one statement (always one
# row: NULLs for a stream without events or a queue row)
_HEAD = (
    "SELECT (SELECT version FROM events WHERE stream_id = ?1 ORDER BY version DESC LIMIT 1), "
    "(SELECT position FROM events WHERE stream_id = ?1 ORDER BY version DESC LIMIT 1), "
    "(SELECT lease_owner FROM queue WHERE stream_id = ?1)"
)
_INSERT = "INSERT INTO events (stream_id, version, topic, data) VALUES (?, ?, ?, ?)"


class Refused(Exception):
    """A lone commit's conflict: its transaction is rolled back rather than a savepoint."""

    def __init__(self, conflict: VersionConflictError) -> None:
        self.conflict = conflict


def apply_commits(conn: sqlite3.Connection, commits: Sequence[Commit]) -> list[Outcome]:
    """Each commit's last position, or its conflict, in order (inside a transaction)."""
    if len(commits) == 1:
        return [_apply_one(conn, commits[0], alone=True)]
    if len({commit.stream_id for commit in commits}) < len(commits):
        return [_apply_one(conn, commit) for commit in commits]
    conn.execute("SAVEPOINT set_of_commits")
    try:
        outcomes = _apply_set(conn, commits)
    except sqlite3.IntegrityError:  # a stream changed under the checks: go one by one
        conn.execute("ROLLBACK TO set_of_commits")
        conn.execute("RELEASE set_of_commits")
        return [_apply_one(conn, commit) for commit in commits]
    conn.execute("RELEASE set_of_commits")
    return outcomes


def _heads(conn: sqlite3.Connection, stream_ids: list[str]) -> dict[str, tuple[int, str | None]]:
    """Each stream's last version (0 if it has no events) and lease holder."""
    rows = conn.execute(_HEADS, (orjson.dumps(stream_ids).decode(),))
    return {stream_id: (version or 0, holder) for stream_id, version, holder in rows}


def _apply_set(conn: sqlite3.Connection, commits: Sequence[Commit]) -> list[Outcome]:
    heads = _heads(conn, [commit.stream_id for commit in commits])
    outcomes: list[Outcome] = []
    accepted: list[Commit] = []
    rows: list[tuple[str, int, str, bytes]] = []
    for commit in commits:
        current, holder = heads.get(commit.stream_id, (0, None))
        if current != commit.expected_version:
            outcomes.append(version_conflict(commit, current))
        elif commit.lease_owner is not None and holder != commit.lease_owner:
            outcomes.append(lease_conflict(commit, holder))
        else:  # a commit without events answers the stream's last position
            outcomes.append(0 if commit.events else _last_position(conn, commit.stream_id))
            accepted.append(commit)
            rows.extend((e.stream_id, e.version, e.topic, e.data) for e in commit.events)
    if rows:
        conn.executemany(_INSERT, rows)
        (last,) = conn.execute("SELECT last_insert_rowid()").fetchone()
        position = int(last) - len(rows)
        for index, commit in enumerate(commits):
            if commit.events and not isinstance(outcomes[index], VersionConflictError):
                position += len(commit.events)
                outcomes[index] = position
    for commit in accepted:
        _after_events(conn, commit)
    return outcomes


def _last_position(conn: sqlite3.Connection, stream_id: str) -> int:
    row = conn.execute(
        "SELECT position FROM events WHERE stream_id = ? ORDER BY version DESC LIMIT 1",
        (stream_id,),
    ).fetchone()
    return 0 if row is None else int(row[0])


def _apply_one(conn: sqlite3.Connection, commit: Commit, *, alone: bool = False) -> Outcome:
    """Check and write one commit under a savepoint; a conflict leaves nothing of it.

    ``alone`` (the batch's only commit) needs no savepoint: a conflict raises
    :class:`Refused` and the whole transaction is rolled back instead.
    """
    if not alone:
        conn.execute("SAVEPOINT one_commit")
    try:
        current, position, holder = conn.execute(_HEAD, (commit.stream_id,)).fetchone()
        current, position = current or 0, position or 0
        if current != commit.expected_version:
            raise version_conflict(commit, current)
        if commit.lease_owner is not None and holder != commit.lease_owner:
            raise lease_conflict(commit, holder)
        if len(commit.events) == 1:
            event = commit.events[0]
            inserted = conn.execute(
                _INSERT, (event.stream_id, event.version, event.topic, event.data)
            )
            position = inserted.lastrowid
        elif commit.events:
            conn.executemany(
                _INSERT, [(e.stream_id, e.version, e.topic, e.data) for e in commit.events]
            )
            (position,) = conn.execute("SELECT last_insert_rowid()").fetchone()
        _after_events(conn, commit)
    except (VersionConflictError, sqlite3.IntegrityError) as exc:
        conflict = (
            exc
            if isinstance(exc, VersionConflictError)
            else version_conflict(commit, stream_version(conn, commit.stream_id))
        )
        if alone:
            raise Refused(conflict) from None
        conn.execute("ROLLBACK TO one_commit")
        conn.execute("RELEASE one_commit")
        return conflict
    if not alone:
        conn.execute("RELEASE one_commit")
    return int(position)


def _after_events(conn: sqlite3.Connection, commit: Commit) -> None:
    """A commit's inbox deletions, outbox posts and queue change."""
    if commit.consumed:
        conn.executemany(
            "DELETE FROM inbox WHERE id = ? AND stream_id = ?",
            [(item_id, commit.stream_id) for item_id in dict.fromkeys(commit.consumed)],
        )
    for outgoing in commit.outbox:
        post_in(
            conn, outgoing.stream_id, outgoing.kind, outgoing.name, outgoing.data, outgoing.now_ms
        )
    update = commit.queue
    if update is None:
        return
    if update.kind in ("enqueue", "suspend"):
        pending = update.kind == "suspend" and has_inbox(conn, commit.stream_id)
        conn.execute(
            "INSERT OR REPLACE INTO queue (stream_id, step_id, priority, due_ms, "
            "lease_owner, lease_expires_ms) VALUES (?, ?, ?, ?, NULL, 0)",
            (
                commit.stream_id,
                update.step_id,
                update.priority,
                queued_due_ms(update, inbox_pending=pending),
            ),
        )
    elif update.kind == "lease":
        conn.execute(
            "INSERT OR REPLACE INTO queue (stream_id, step_id, priority, due_ms, "
            "lease_owner, lease_expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (
                commit.stream_id,
                update.step_id,
                update.priority,
                update.due_ms,
                update.owner,
                update.lease_expires_ms,
            ),
        )
    else:
        conn.execute("DELETE FROM queue WHERE stream_id = ?", (commit.stream_id,))


def post_in(
    conn: sqlite3.Connection, stream_id: str, kind: str, name: str, data: bytes, now_ms: int
) -> int:
    """Insert an inbox item and wake the stream's queue row (a lease, if any, stays)."""
    cursor = conn.execute(
        "INSERT INTO inbox (stream_id, kind, name, data, posted_ms) VALUES (?, ?, ?, ?, ?)",
        (stream_id, kind, name, bytes(data), now_ms),
    )
    conn.execute(
        "UPDATE queue SET due_ms = ? WHERE stream_id = ? AND due_ms > ?",
        (now_ms, stream_id, now_ms),
    )
    return int(cursor.lastrowid or 0)


def has_inbox(conn: sqlite3.Connection, stream_id: str) -> bool:
    found = conn.execute("SELECT 1 FROM inbox WHERE stream_id = ? LIMIT 1", (stream_id,))
    return found.fetchone() is not None


def stream_version(conn: sqlite3.Connection, stream_id: str) -> int:
    (version,) = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?", (stream_id,)
    ).fetchone()
    return int(version)
