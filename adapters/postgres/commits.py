"""Writing one group commit's commits: the arguments of the server-side append function.

:func:`apply_commits` flattens the commits into the 21 arrays of ``{s}.append_v4`` (see
:mod:`.append_function`, where the checks and writes are described) and turns the three
arrays it returns into each commit's last position or its VersionConflictError. On an
autocommit connection the call is one statement, its own transaction: one round trip and
one WAL flush for the whole group; inside a transaction (a transactional step's) it joins it.

The call is built for the shape of its arguments (and kept, per shape): a group of arrays
that no commit uses is a ``NULL`` literal, and an array of one element is written
``ARRAY[%s::type]`` so the driver dumps a scalar (in C) instead of a list (in Python); only
longer arrays are sent as arrays, in binary. A group of one commit of one event and nothing
else (a sequential ``ctx.do``'s) calls the one-event function instead, with five scalars.

A refused commit writes nothing and the other commits are not affected (the function
pre-checks each, no savepoints); a commit the server cannot store at all (a value it
refuses) fails the whole statement, and :mod:`.log` then settles the batch commit by commit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from stepsource.adapters._rules import lease_conflict, version_conflict
from stepsource.adapters.ports import Commit
from stepsource.adapters.postgres.append_function import (
    APPEND_FUNCTION,
    APPEND_ONE_FUNCTION,
    ARGUMENT_TYPES,
)
from stepsource.adapters.postgres.pool import Conn
from stepsource.errors import VersionConflictError

__all__ = ["Outcome", "apply_commits"]

Outcome = int | VersionConflictError

_ACCEPTED, _VERSION_CONFLICT = 0, 1


def _present(columns: tuple[list[object], ...]) -> tuple[list[object] | None, ...]:
    """The columns, or NULLs where no commit has a value (nothing for the driver to scan)."""
    if any(value is not None for value in columns[0]):
        return columns
    return (None,) * len(columns)


def _arguments(commits: Sequence[Commit]) -> tuple[list[object] | None, ...]:
    """The function's 21 arrays, in its parameter order (a group none of the commits uses,
    such as the lease owners, queue updates, consumed items or outbox of ``ctx.do``'s
    commits, is passed as NULL arrays: the function reads NULL from them)."""
    streams: list[object] = []
    expected: list[object] = []
    owners: list[object] = []
    counts: list[object] = []
    topics: list[object] = []
    datas: list[object] = []
    queue: tuple[list[object], ...] = ([], [], [], [], [], [], [])
    consumed: tuple[list[object], list[object]] = ([], [])
    outbox: tuple[list[object], ...] = ([], [], [], [], [], [])
    for index, commit in enumerate(commits, start=1):
        streams.append(commit.stream_id)
        expected.append(commit.expected_version)
        owners.append(commit.lease_owner)
        counts.append(len(commit.events))
        for event in commit.events:
            topics.append(event.topic)
            datas.append(bytes(event.data))
        update = commit.queue
        row = (
            (None, None, None, None, None, None, None)
            if update is None
            else (
                update.kind,
                update.step_id,
                update.priority,
                update.due_ms,
                update.now_ms,
                update.owner,
                update.lease_expires_ms,
            )
        )
        for column, cell in zip(queue, row, strict=True):
            column.append(cell)
        for item_id in dict.fromkeys(commit.consumed):
            consumed[0].append(index)
            consumed[1].append(item_id)
        for out in commit.outbox:
            values = (index, out.stream_id, out.kind, out.name, bytes(out.data), out.now_ms)
            for column, value in zip(outbox, values, strict=True):
                column.append(value)
    return (
        streams,
        expected,
        *_present((owners,)),
        counts,
        topics,
        datas,
        *_present(queue),
        *_present(consumed),
        *_present(outbox),
    )


def one_event_arguments(commit: Commit) -> list[object] | None:
    """The arguments of ``append_one_v3`` for a commit of one event with no queue update,
    consumed item or outbox post (the most common commit); None for any other commit."""
    if len(commit.events) != 1 or commit.queue is not None or commit.consumed or commit.outbox:
        return None
    event = commit.events[0]
    data = bytes(event.data)
    return [commit.stream_id, commit.expected_version, commit.lease_owner, event.topic, data]


@functools.cache
def _call(schema: str, shape: tuple[int, ...]) -> bytes:
    """The call for arguments of this shape (per argument: 0 NULL, 1 one element, 2 more);
    for one commit its outcome comes back as three scalars, not three arrays."""
    written = (
        f"NULL::{kind}[]" if form == 0 else f"ARRAY[%s::{kind}]" if form == 1 else f"%b::{kind}[]"
        for kind, form in zip(ARGUMENT_TYPES, shape, strict=True)
    )
    out = "kinds[1], vals[1], holders[1]" if shape[0] == 1 else "kinds, vals, holders"
    return f"SELECT {out} FROM {schema}.{APPEND_FUNCTION}({', '.join(written)})".encode()


@functools.cache
def _call_one(schema: str) -> bytes:
    """The call of the one-event function (five scalars in, three out)."""
    return (
        f"SELECT kind, val, holder FROM {schema}.{APPEND_ONE_FUNCTION}(%s, %s, %s, %s, %s)".encode()
    )


async def apply_commits(conn: Conn, s: str, commits: Sequence[Commit]) -> list[Outcome]:
    """Each commit's last position, or its conflict, in order: one call of the function."""
    cursor = conn.kept_cursor()
    one = one_event_arguments(commits[0]) if len(commits) == 1 else None
    if one is not None:
        await cursor.execute(_call_one(s), one)
        row = await cursor.fetchone()
        assert row is not None
        kinds, values, holders = ([cell] for cell in row)
    else:
        arguments = _arguments(commits)
        shape = tuple(0 if a is None else 1 if len(a) == 1 else 2 for a in arguments)
        params = [a[0] if len(a) == 1 else a for a in arguments if a is not None]
        await cursor.execute(_call(s, shape), params)
        row = await cursor.fetchone()
        assert row is not None
        kinds, values, holders = ([cell] for cell in row) if shape[0] == 1 else row
    outcomes: list[Outcome] = []
    for commit, kind, value, holder in zip(commits, kinds, values, holders, strict=True):
        if kind == _ACCEPTED:
            outcomes.append(int(value))
        elif kind == _VERSION_CONFLICT:
            outcomes.append(version_conflict(commit, int(value)))
        else:
            outcomes.append(lease_conflict(commit, holder))
    return outcomes
