"""Writing one group commit's commits inside its one PostgreSQL transaction.

The transaction first takes the events table in EXCLUSIVE mode (plain reads go on beside
it; other writers of events wait), so the checks below cannot be raced and positions are
handed out in commit order: a reader paging by position never skips an event that commits
later. It then reads, for every stream of the batch, the last version and position and the
queue row's lease holder (``FOR UPDATE``: a ``lease`` in another transaction skips the row
until this one commits, so a takeover cannot slip between the lease check and the append).

Each commit is then checked in order against those heads, advanced by the commits accepted
before it (a batch may name a stream twice): a refused commit writes nothing and gets its
VersionConflictError, and the other commits are not affected (pre-checks, not savepoints).
The accepted commits' events go in with one ``INSERT ... SELECT FROM unnest(...)``; their
inbox deletions, outbox posts and queue changes follow in order, pipelined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stepsource.adapters._rules import lease_conflict, version_conflict
from stepsource.adapters.ports import Commit
from stepsource.adapters.postgres.pool import Conn
from stepsource.adapters.postgres.wakeups import notify
from stepsource.errors import VersionConflictError

__all__ = ["Outcome", "apply_commits", "post_in"]

Outcome = int | VersionConflictError


@dataclass(slots=True)
class _Head:
    version: int
    position: int
    holder: str | None


async def _heads(conn: Conn, s: str, stream_ids: list[str]) -> dict[str, _Head]:
    cursor = await conn.execute(
        f"SELECT ids.id, e.version, e.position FROM unnest(%s::text[]) AS ids(id) "
        f"LEFT JOIN LATERAL (SELECT version, position FROM {s}.events "
        "WHERE stream_id = ids.id ORDER BY version DESC LIMIT 1) AS e ON true",
        (stream_ids,),
    )
    heads = {row[0]: _Head(row[1] or 0, row[2] or 0, None) for row in await cursor.fetchall()}
    cursor = await conn.execute(
        f"SELECT stream_id, lease_owner FROM {s}.queue WHERE stream_id = ANY(%s) "
        "ORDER BY stream_id FOR UPDATE",
        (stream_ids,),
    )
    for stream_id, holder in await cursor.fetchall():
        heads[stream_id].holder = holder
    return heads


async def apply_commits(conn: Conn, s: str, commits: Sequence[Commit]) -> list[Outcome]:
    """Each commit's last position, or its conflict, in order (inside a transaction)."""
    await conn.execute(f"LOCK TABLE {s}.events IN EXCLUSIVE MODE")
    heads = await _heads(conn, s, list(dict.fromkeys(commit.stream_id for commit in commits)))
    cursor = await conn.execute(f"SELECT COALESCE(MAX(position), 0) FROM {s}.events")
    row = await cursor.fetchone()
    position = 0 if row is None else int(row[0])
    outcomes: list[Outcome] = []
    accepted: list[Commit] = []
    positions: list[int] = []
    rows: list[tuple[str, int, str, bytes]] = []
    for commit in commits:
        head = heads[commit.stream_id]
        if head.version != commit.expected_version:
            outcomes.append(version_conflict(commit, head.version))
            continue
        if commit.lease_owner is not None and head.holder != commit.lease_owner:
            outcomes.append(lease_conflict(commit, head.holder))
            continue
        for event in commit.events:
            position += 1
            positions.append(position)
            rows.append((event.stream_id, event.version, event.topic, bytes(event.data)))
        if commit.events:
            head.version, head.position = commit.events[-1].version, position
        update = commit.queue
        if update is not None:  # what the queue row's lease holder becomes
            head.holder = update.owner if update.kind == "lease" else None
        outcomes.append(head.position)
        accepted.append(commit)
    if rows:
        streams, versions, topics, datas = (list(column) for column in zip(*rows, strict=True))
        await conn.execute(
            f"INSERT INTO {s}.events (position, stream_id, version, topic, data) "
            "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[], "
            "%s::bytea[])",
            (positions, streams, versions, topics, datas),
        )
    if any(c.consumed or c.outbox or c.queue is not None for c in accepted):
        async with conn.pipeline():
            for commit in accepted:
                await _after_events(conn, s, commit)
            if any(c.outbox or c.queue is not None for c in accepted):
                await notify(conn, s)  # work queued or an execution changed state
    return outcomes


async def _after_events(conn: Conn, s: str, commit: Commit) -> None:
    """A commit's inbox deletions, outbox posts and queue change."""
    if commit.consumed:
        await conn.execute(
            f"DELETE FROM {s}.inbox WHERE stream_id = %s AND id = ANY(%s::bigint[])",
            (commit.stream_id, list(dict.fromkeys(commit.consumed))),
        )
    for outgoing in commit.outbox:
        await post_in(
            conn,
            s,
            outgoing.stream_id,
            outgoing.kind,
            outgoing.name,
            outgoing.data,
            outgoing.now_ms,
        )
    update = commit.queue
    if update is None:
        return
    if update.kind == "done":
        await conn.execute(f"DELETE FROM {s}.queue WHERE stream_id = %s", (commit.stream_id,))
        return
    if update.kind == "lease":
        due = "%(due)s"
        owner, expires = update.owner, update.lease_expires_ms
    else:  # enqueue, or suspend: due at once if items are still waiting (_rules.queued_due_ms)
        due = (
            f"CASE WHEN %(suspend)s AND EXISTS (SELECT 1 FROM {s}.inbox "
            "WHERE stream_id = %(stream)s) THEN LEAST(%(due)s, %(now)s) ELSE %(due)s END"
        )
        owner, expires = None, 0
    await conn.execute(
        f"INSERT INTO {s}.queue (stream_id, step_id, priority, due_ms, lease_owner, "
        f"lease_expires_ms) VALUES (%(stream)s, %(step)s, %(priority)s, {due}, %(owner)s, "
        "%(expires)s) ON CONFLICT (stream_id) DO UPDATE SET step_id = excluded.step_id, "
        "priority = excluded.priority, due_ms = excluded.due_ms, "
        "lease_owner = excluded.lease_owner, lease_expires_ms = excluded.lease_expires_ms",
        {
            "stream": commit.stream_id,
            "step": update.step_id,
            "priority": update.priority,
            "due": update.due_ms,
            "now": update.now_ms,
            "suspend": update.kind == "suspend",
            "owner": owner,
            "expires": expires,
        },
    )
    if update.kind == "suspend":
        # Again, now that this transaction holds the row: an item posted while the statement
        # above ran (its snapshot could not see it) found the row leased and left its due
        # time alone; this statement's new snapshot sees it, and a post still to come finds
        # the row suspended and makes it due itself.
        await conn.execute(
            f"UPDATE {s}.queue SET due_ms = LEAST(due_ms, %(now)s) WHERE stream_id = %(stream)s "
            f"AND EXISTS (SELECT 1 FROM {s}.inbox WHERE stream_id = %(stream)s)",
            {"stream": commit.stream_id, "now": update.now_ms},
        )


async def post_in(
    conn: Conn, s: str, stream_id: str, kind: str, name: str, data: bytes, now_ms: int
) -> int:
    """Insert an inbox item and wake the stream's queue row (a lease, if any, stays); the
    item's id."""
    cursor = await conn.execute(
        f"INSERT INTO {s}.inbox (stream_id, kind, name, data, posted_ms) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (stream_id, kind, name, bytes(data), now_ms),
    )
    row = await cursor.fetchone()
    assert row is not None
    # every row of the stream is written (and so locked until this commits), a later due
    # time made now: a suspension being committed at the same moment either waits for this
    # post and then sees its item, or commits first and this makes its row due
    await conn.execute(
        f"UPDATE {s}.queue SET due_ms = LEAST(due_ms, %s) WHERE stream_id = %s",
        (now_ms, stream_id),
    )
    return int(row[0])
