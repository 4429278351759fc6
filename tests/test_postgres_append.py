"""The PostgreSQL backend's server-side append (``append_v4``, one round trip per group
commit) and its one-statement queue calls: a database of the previous layout migrates, a
batch of commits written by one call behaves as the same commits written one by one (as the
memory reference writes them), and the lease check refuses a stale lease inside a batch."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.abc import Params

from stepsource.adapters.contract import check_log, enqueue, make_commit, suspend
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend, Commit, Outgoing, QueueUpdate
from stepsource.adapters.postgres.append_function import (
    APPEND_FUNCTION,
    APPEND_ONE_FUNCTION,
    PREVIOUS_FUNCTION,
)
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.adapters.postgres.commits import _arguments, _call, _call_one, one_event_arguments
from stepsource.adapters.postgres.schema import LAYOUT_CHECK, TABLES, layout_check, statements
from stepsource.errors import VersionConflictError
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only


def _schema() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


def _layout(server: PostgresServer, schema: str) -> tuple[int, bool]:
    with psycopg.connect(server.url()) as conn:
        row = conn.execute(LAYOUT_CHECK, layout_check(schema)).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "missing",
    [
        (PREVIOUS_FUNCTION, APPEND_ONE_FUNCTION, APPEND_FUNCTION),  # layout 1
        (APPEND_ONE_FUNCTION, APPEND_FUNCTION),  # layout 2
        (APPEND_FUNCTION,),  # layout 3
    ],
)
async def test_a_database_of_a_previous_layout_migrates_on_open(
    postgres_server: PostgresServer, missing: tuple[str, ...]
) -> None:
    """An earlier release made the tables and appended statement by statement (no function)
    or through the general function only; this one adds what is missing the first time it
    opens the schema and carries on from the stored positions, versions and lease."""
    schema = _schema()
    previous = [sql for sql in statements(schema) if not any(f"{f}(" in sql for f in missing)]
    assert len(previous) == len(statements(schema)) - len(missing)  # the tables are unchanged
    with psycopg.connect(postgres_server.url()) as conn:
        for sql in previous:
            conn.execute(sql)
        conn.execute(  # what the previous release had stored: a leased stream, 2 events
            f"INSERT INTO {schema}.events VALUES (1, 's', 1, 't', 'a'), (2, 's', 2, 't', 'b')"
        )
        conn.execute(f"INSERT INTO {schema}.queue VALUES ('s', 'step', 0, 0, 'w1', 10000)")
    assert _layout(postgres_server, schema) == (len(TABLES), False)
    backend = PostgresBackend.from_url(postgres_server.url(schema=schema))
    await backend.open()
    assert _layout(postgres_server, schema) == (len(TABLES), True)
    assert await backend.append(make_commit("s", 2, 2, lease_owner="w1")) == 4
    assert await backend.append(make_commit("s", 4, 1, lease_owner="w1")) == 5  # one event
    with pytest.raises(VersionConflictError, match="stream is at version 5"):
        await backend.append(make_commit("s", 2, lease_owner="w1"))
    with pytest.raises(VersionConflictError, match="held by 'w1'"):
        await backend.append(make_commit("s", 5, lease_owner="w2"))
    events = await backend.read_all()
    assert [(e.version, e.position) for e in events] == [(v, v) for v in range(1, 6)]
    await backend.aclose()
    again = PostgresBackend.from_url(postgres_server.url(schema=schema))  # nothing to migrate
    assert await again.append(make_commit("other", 0)) == 6
    await again.aclose()


async def _race(backend: Backend, commits: Sequence[Commit]) -> list[int | str]:
    """Append every commit concurrently, in this order; each one's position or conflict."""
    outcomes: list[int | str] = [""] * len(commits)

    async def one(index: int, commit: Commit) -> None:
        try:
            outcomes[index] = await backend.append(commit)
        except VersionConflictError as exc:
            outcomes[index] = "lease" if "may not append" in exc.reason else "version"

    async with anyio.create_task_group() as group:
        for index, commit in enumerate(commits):
            group.start_soon(one, index, commit)
    return outcomes


@pytest.mark.anyio
async def test_a_stale_lease_is_refused_inside_a_batch_and_spares_the_rest(
    postgres_server: PostgresServer,
) -> None:
    backend = PostgresBackend.from_url(postgres_server.url(schema=_schema()))
    await backend.append(make_commit("job", 0, queue=enqueue("step")))
    await backend.append(make_commit("warm", 0))
    [first] = await backend.lease("w1", ["step"], 0, 100, 1)
    [taken] = await backend.lease("w2", ["step"], 200, 1000, 1)  # w1's lease expired at 100
    assert first.stream_id == taken.stream_id == "job"
    before = backend.commits_written
    outcomes = await _race(
        backend,
        [
            make_commit("warm", 1),  # written alone: the others queue behind it
            make_commit("job", 1, lease_owner="w1"),  # the zombie
            make_commit("job", 1, 2, lease_owner="w2"),  # the holder
            make_commit("job", 3, lease_owner="w2", queue=QueueUpdate("done")),
            make_commit("job", 1, lease_owner="w2"),  # stale version, same batch
            make_commit("fresh", 0, 3),
        ],
    )
    assert outcomes == [3, "lease", 5, 6, "version", 9]
    assert backend.commits_written - before == 2  # one call for the five behind the first
    job = await backend.read_stream("job")
    assert [e.data for e in job[1:]] == [b"job:2", b"job:3", b"job:4"]  # the holder's only
    assert await backend.lease("w3", ["step"], 10**6, 1000, 10) == []  # done: off the queue
    check_log(await backend.read_all())
    await backend.aclose()


# -- a batch written by one call is the same commits written one by one --------------------
_STREAMS = ("a", "b", "c")


@st.composite
def _commit_specs(draw: st.DrawFn) -> list[tuple[str, int, int, str, str | None, int, bool]]:
    """(stream, version offset, events, queue kind, lease owner, consumed, outbox) rows."""
    row = st.tuples(
        st.sampled_from(_STREAMS),
        st.sampled_from((0, 0, 0, -1, 1)),  # mostly right, sometimes stale or ahead
        st.integers(0, 3),
        st.sampled_from(("", "", "enqueue", "suspend", "lease", "done")),
        st.sampled_from((None, None, "w1", "w2")),
        st.integers(0, 2),
        st.booleans(),
    )
    return draw(st.lists(row, min_size=2, max_size=8))


async def _play(
    backend: Backend, specs: list[tuple[str, int, int, str, str | None, int, bool]]
) -> tuple[object, ...]:
    """Set the same start on the backend, race the commits the specs describe, and return
    everything a user can observe afterwards."""
    for n, stream in enumerate(_STREAMS):
        leased = QueueUpdate("lease", step_id="step", due_ms=0, owner="w1", lease_expires_ms=9)
        await backend.append(make_commit(stream, 0, n + 1, queue=leased))
        for m in range(2):
            await backend.post(stream, "signal", f"n{m}", b"x", 5)
    items = {s: [i.id for i in await backend.inbox(s)] for s in _STREAMS}
    heads = {stream: n + 1 for n, stream in enumerate(_STREAMS)}
    commits = []
    for stream, offset, count, kind, owner, consumed, outbox in specs:
        expected = max(0, heads[stream] + offset)
        updates: dict[str, QueueUpdate | None] = {
            "": None,
            "enqueue": enqueue("step", 30),
            "suspend": suspend("step", 40, 7),
            "lease": QueueUpdate(
                "lease", step_id="step", due_ms=0, owner="w2", lease_expires_ms=50
            ),
            "done": QueueUpdate("done"),
        }
        update = updates[kind]
        target = _STREAMS[(_STREAMS.index(stream) + 1) % len(_STREAMS)]
        commits.append(
            make_commit(
                stream,
                expected,
                count,
                queue=update,
                lease_owner=owner,
                consumed=items[stream][:consumed],
                outbox=[Outgoing(target, "child", stream, b"done", 8)] if outbox else (),
            )
        )
        heads[stream] = expected + count
    outcomes = await _race(backend, commits)
    log = [(e.stream_id, e.version, e.topic, e.data, e.position) for e in await backend.read_all()]
    inboxes = {s: [(i.kind, i.name, i.data) for i in await backend.inbox(s)] for s in _STREAMS}
    queue = [
        (lease.stream_id, lease.priority)
        for now in (0, 8, 31, 41, 60)
        for lease in await backend.lease(f"r{now}", ["step"], now, 1, 10)
    ]
    return outcomes, log, inboxes, queue


@pytest.mark.anyio
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs=_commit_specs())
async def test_a_batch_in_one_call_matches_the_memory_reference_one_by_one(
    postgres_server: PostgresServer,
    specs: list[tuple[str, int, int, str, str | None, int, bool]],
) -> None:
    postgres = PostgresBackend.from_url(postgres_server.url(schema=_schema()))
    try:
        ours = await _play(postgres, specs)
    finally:
        await postgres.aclose()
    reference = await _play(MemoryBackend(), specs)
    assert ours == reference


@pytest.mark.anyio
async def test_wake_ups_are_sent_by_the_calls_that_make_work_and_only_when_they_write(
    postgres_server: PostgresServer,
) -> None:
    """The one-statement calls still notify the schema's listeners: an accepted commit that
    changes the queue or posts to an inbox, a post, a release; not a commit of events only,
    nor a refused one."""
    schema = _schema()
    backend = PostgresBackend.from_url(postgres_server.url(schema=schema))
    await backend.open()
    listener = await psycopg.AsyncConnection.connect(postgres_server.url(), autocommit=True)
    await listener.execute("LISTEN stepsource_wake")

    async def woken() -> int:
        """How many notices for this schema arrived since the last look."""
        count = 0
        with anyio.move_on_after(0.3):
            async for note in listener.notifies():
                count += note.payload == schema
        return count

    await backend.append(make_commit("s", 0, queue=enqueue("step")))
    assert await woken() == 1
    await backend.append(make_commit("s", 1))  # events only
    assert await woken() == 0
    with pytest.raises(VersionConflictError):  # refused: writes nothing, wakes no one
        await backend.append(make_commit("s", 0, queue=enqueue("step")))
    assert await woken() == 0
    child = Outgoing("other", "child", "s", b"done", 5)
    await backend.append(make_commit("s", 2, outbox=[child]))
    assert await woken() == 1
    await backend.post("s", "signal", "go", b"x", 5)
    assert await woken() == 1
    [lease] = await backend.lease("w1", ["step"], 10, 1000, 1)
    await backend.release("w1", lease.stream_id)
    assert await woken() == 1
    await listener.close()
    await backend.aclose()


_ONE_EVENT_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["s1", "s2"]),
        st.integers(-1, 1),  # the expected version, relative to the stream's current one
        st.sampled_from([None, "w1", "w2"]),  # the commit's lease owner
        st.sampled_from([None, "w1"]),  # who holds the stream's lease before it
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.anyio
@given(steps=_ONE_EVENT_STEPS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_the_one_event_function_does_what_the_general_one_does(
    postgres_server: PostgresServer, steps: list[tuple[str, int, str | None, str | None]]
) -> None:
    """The most common commit (one event, nothing else) goes through a function of its own;
    the same commits sent to it and to the general function (on two fresh schemas) get the
    same outcomes and leave the same events and queue rows."""
    twins = [_schema(), _schema()]
    for schema in twins:
        for sql in statements(schema):
            await _execute(postgres_server, sql)
    for stream, offset, owner, holder in steps:
        results: list[tuple[Any, ...]] = []
        for schema, call in zip(twins, (_call_one(twins[0]), None), strict=True):
            await _execute(
                postgres_server,
                f"INSERT INTO {schema}.queue VALUES (%s, 'job', 0, 0, %s, 10) "
                "ON CONFLICT (stream_id) DO UPDATE SET lease_owner = excluded.lease_owner",
                (stream, holder),
            )
            version = await _scalar(
                postgres_server,
                f"SELECT coalesce(max(version), 0) FROM {schema}.events WHERE stream_id = %s",
                (stream,),
            )
            commit = make_commit(stream, max(version + offset, 0), lease_owner=owner)
            one = one_event_arguments(commit)
            assert one is not None
            if call is not None:
                results.append(await _row(postgres_server, call, one))
            else:
                arguments = [a for a in _arguments([commit]) if a is not None]
                shape = tuple(0 if a is None else 1 for a in _arguments([commit]))
                general = _call(schema, shape)
                results.append(await _row(postgres_server, general, [a[0] for a in arguments]))
        assert results[0] == results[1]
    tables = []
    for schema in twins:
        tables.append(
            (
                await _rows(postgres_server, f"SELECT * FROM {schema}.events ORDER BY position"),
                await _rows(postgres_server, f"SELECT * FROM {schema}.queue ORDER BY stream_id"),
            )
        )
    assert tables[0] == tables[1]


async def _execute(server: PostgresServer, sql: str | bytes, params: Params | None = None) -> None:
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as conn:
        await conn.execute(sql, params)


async def _rows(
    server: PostgresServer, sql: str | bytes, params: Params | None = None
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall()


async def _row(server: PostgresServer, sql: str | bytes, params: Params) -> tuple[Any, ...]:
    [row] = await _rows(server, sql, params)
    return row


async def _scalar(server: PostgresServer, sql: str | bytes, params: Params) -> int:
    value = (await _row(server, sql, params))[0]
    assert isinstance(value, int)
    return value
