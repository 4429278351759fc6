"""``stepsource export --to URL``: the whole log copied into another backend, verified.

A SQLite log populated by real executions is exported to another SQLite file with the real
entry point; every projection (state, history, checkpoints, record, events, the executions
index) is equal on both sides, and an execution that had not ended carries on in the copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.engine.export import export_log
from stepsource.testing.nats_server import NatsServer
from stepsource.testing.postgres_server import PostgresServer

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import cli_app_v1  # noqa: E402
from conftest import postgres_url  # noqa: E402

DEADLINE = 30.0
STEPSOURCE = str(Path(sys.executable).parent / "stepsource")


def stepsource(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
    return subprocess.run(
        [STEPSOURCE, "--url", url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def populate(url: str) -> list[str]:
    engine = cli_app_v1.engine.derive(url=url, workers=4)
    async with engine:
        handles = [await engine.start("cli.order", {"items": [n, 2 * n]}) for n in range(4)]
        handles.append(await engine.start("cli.flaky", {"n": 3}))
        handles.append(await engine.start("cli.waiter", {"name": "go"}))
        for handle in handles[:-1]:
            await handle.result(timeout=DEADLINE)
        with anyio.fail_after(DEADLINE):
            while not await engine.executions(status="waiting"):
                await anyio.sleep(0.02)
    await engine.aclose()
    # sent once no worker runs: a running one could wake the waiter and take the signal into
    # its stream before the export, leaving no inbox item to copy
    client = cli_app_v1.engine.derive(url=url, workers=0)
    await client.get_handle(handles[-1].execution_id).signal("nudge", "in the inbox")
    await client.aclose()
    return [h.execution_id for h in handles]


async def projections(url: str, ids: list[str]) -> dict[str, Any]:
    engine = ss.Engine(url, workers=0)
    seen: dict[str, Any] = {}
    for eid in ids:
        events = await engine.events(eid)
        seen[eid] = {
            "state": await engine.state_of(eid),
            "history": await engine.history_of(eid),
            "checkpoints": await engine.checkpoints_of(eid),
            "record": await engine.describe(eid),
            "early": await engine.state_of(eid, at_version=4),
            "events": [(type(e).__name__, e.originator_version, e.timestamp) for e in events],
        }
    seen["index"] = await engine.executions(limit=1000)
    await engine.aclose()
    return seen


def test_export_to_another_sqlite_file_round_trips_every_projection(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    ids = anyio.run(populate, source)

    done = stepsource(source, "export", "--to", target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"of {len(ids)} executions" in done.stdout
    assert "1 not ended were queued; 1 inbox items, 3 step definitions and 0 global-state" in (
        done.stdout
    )
    assert "verified: event counts, every stream's last version and the global state" in (
        done.stdout
    )
    assert "exporting" in done.stderr  # the progress bar

    assert anyio.run(projections, target, ids) == anyio.run(projections, source, ids)
    again = stepsource(source, "export", "--to", target, "--json")
    assert again.returncode == 2
    assert "already holds events" in again.stderr

    # the copy is a working log: the waiting execution gets its signal and event and ends there
    async def finish_in_copy() -> Any:
        engine = cli_app_v1.engine.derive(url=target, workers=2)
        async with engine:
            handle = engine.get_handle(ids[-1])
            await handle.send_event("go", "from the copy")
            return await handle.result(timeout=DEADLINE)

    assert anyio.run(finish_in_copy) == {"received": "from the copy", "signals": ["in the inbox"]}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_export_reports_counts_and_refuses_a_non_empty_target(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'source.db'}"
    ids = await populate(url)
    engine = ss.Engine(url, workers=0)
    target = MemoryBackend()
    seen: list[tuple[int, int]] = []
    report = await export_log(engine.store, target, progress=lambda d, t: seen.append((d, t)))
    assert report.verified
    assert report.streams == len(ids)
    assert report.events == await engine._backend.max_position() == await target.max_position()
    assert seen[-1] == (report.events, report.events)
    for eid in ids:
        assert await target.stream_version(eid) == await engine._backend.stream_version(eid)
    with pytest.raises(ss.UsageError, match="already holds events"):
        await export_log(engine.store, target)
    await engine.aclose()


def test_export_json_report(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    anyio.run(populate, source)
    done = stepsource(source, "export", "--to", f"sqlite:///{tmp_path / 'copy.db'}", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True
    assert report["mismatches"] == []
    assert report["streams"] == 6
    assert report["open_executions"] == 1


def test_export_from_sqlite_to_nats_round_trips_every_projection(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    target = f"{nats_server.url}?stream=EXPORT{os.getpid()}"
    ids = anyio.run(populate, source)
    done = stepsource(source, "export", "--to", target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified: event counts, every stream's last version and the global state" in (
        done.stdout
    )

    def views(url: str) -> dict[str, Any]:
        seen = anyio.run(projections, url, ids)
        seen.pop("index")  # positions differ by backend; compared below without them
        return seen

    assert views(target) == views(source)
    before = anyio.run(projections, source, ids)["index"]
    after = anyio.run(projections, target, ids)["index"]
    assert [(s.execution_id, s.status, s.version) for s in after] == [
        (s.execution_id, s.status, s.version) for s in before
    ]


def test_export_from_sqlite_to_postgres_and_back_round_trips_every_projection(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    middle = postgres_server.url(schema=f"export{os.getpid()}")
    back = f"sqlite:///{tmp_path / 'back.db'}"
    ids = anyio.run(populate, source)
    for origin, target in ((source, middle), (middle, back)):
        done = stepsource(origin, "export", "--to", target)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified: event counts, every stream's last version and the global state" in (
            done.stdout
        )
        assert "1 not ended were queued; 1 inbox items, 3 step definitions" in done.stdout

    seen = {url: anyio.run(projections, url, ids) for url in (source, middle, back)}
    assert seen[back] == seen[source]  # through PostgreSQL and back, the very same views
    indexes = {url: seen[url].pop("index") for url in seen}
    assert seen[middle] == seen[source]
    assert [(s.execution_id, s.status, s.version) for s in indexes[middle]] == [
        (s.execution_id, s.status, s.version) for s in indexes[source]
    ]

    # the copy on PostgreSQL is a working log: the waiting execution ends there
    async def finish_in_copy() -> Any:
        engine = cli_app_v1.engine.derive(url=middle, workers=2)
        async with engine:
            handle = engine.get_handle(ids[-1])
            await handle.send_event("go", "from postgres")
            return await handle.result(timeout=DEADLINE)

    assert anyio.run(finish_in_copy) == {"received": "from postgres", "signals": ["in the inbox"]}


def listener(url: str, **options: Any) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.02, **options)

    @engine.step("export.listener")
    async def listen(ctx: ss.StepContext) -> dict[str, Any]:
        got: list[int] = []
        ctx.on_signal("sig", got.append)
        event = await ctx.wait_for_event("go")
        return {"event": event, "signals": got}

    return engine


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # NATS runs on asyncio
@pytest.mark.parametrize("target_kind", ["sqlite", "nats"])
async def test_messages_after_an_export_reach_an_execution_that_had_taken_some(
    tmp_path: Path, target_kind: str, request: pytest.FixtureRequest
) -> None:
    """The copied records hold the source's inbox ids; the target's ids start past them. They
    restarted at 1, so a signal, an event or a cancel sent after the export to an execution
    that had recorded messages was taken for one it had, and dropped without a word. An item
    still pending at the export is re-posted once, one already recorded is not."""
    source = f"sqlite:///{tmp_path / 'source.db'}"
    if target_kind == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        target = f"{server.url}?stream=INBOX{os.getpid()}{tmp_path.name[-6:]}"
    else:
        target = f"sqlite:///{tmp_path / 'target.db'}"
    engine = listener(source)
    async with engine:
        handle = await engine.start("export.listener")
        for n in (1, 2):
            await handle.signal("sig", n)
        with anyio.fail_after(DEADLINE):
            while True:
                kinds = [type(e).__name__ for e in await engine.events(handle.execution_id)]
                if kinds.count("SignalReceived") == 2 and kinds[-1] == "StepSuspended":
                    break
                await anyio.sleep(0.02)
    client = listener(source, workers=0)
    await client.get_handle(handle.execution_id).signal("sig", 3)  # pending at the export
    into = ss.Engine(target, workers=0)
    try:
        report = await export_log(client.store, into.store.backend)
    finally:
        await into.aclose()
        await client.aclose()
    assert report.verified
    assert report.inbox_items == 1
    copy = listener(target)
    async with copy:
        moved = copy.get_handle(handle.execution_id)
        await moved.signal("sig", 4)
        await moved.send_event("go", "now")
        assert await moved.result(timeout=DEADLINE) == {"event": "now", "signals": [1, 2, 3, 4]}


def global_state_app(url: str) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.02)

    @engine.step("export.set_global")
    async def set_global(ctx: ss.StepContext) -> None:
        await ctx.set_global_state("plan", {"tier": "gold"})
        await ctx.set_global_state("session", "open", ttl=3600)
        await ctx.set_global_state("short", "soon gone", ttl=0.05)
        await ctx.set_global_state("counter", 5)

    @engine.step("export.read_global")
    async def read_global(ctx: ss.StepContext) -> dict[str, Any]:
        while True:  # the documented counter loop
            count = await ctx.get_global_state("counter")
            if await ctx.compare_and_set_global_state("counter", count, count + 1):
                break
        return {
            key: await ctx.get_global_state(key) for key in ("plan", "session", "short", "counter")
        }

    return engine


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # NATS and Redis run on asyncio
@pytest.mark.parametrize("target_kind", ["sqlite", "nats", "redis", "postgres"])
async def test_export_copies_global_state_with_what_is_left_of_its_ttl(
    tmp_path: Path, target_kind: str, request: pytest.FixtureRequest
) -> None:
    """Global state lives in the key-value store beside the log: the export left it behind
    (the target's executions read the defaults). Every live entry is copied with its expiry;
    an expired one is not; the target's compare-and-set carries on from the copied value."""
    source = f"sqlite:///{tmp_path / 'source.db'}"
    unique = f"{os.getpid()}{tmp_path.name[-6:]}"
    if target_kind == "nats":
        target = f"{request.getfixturevalue('nats_server').url}?stream=GLOBAL{unique}"
    elif target_kind == "redis":
        target = f"{request.getfixturevalue('redis_server').url}?prefix=global{unique}"
    elif target_kind == "postgres":
        target = postgres_url(request.getfixturevalue("postgres_server"))
    else:
        target = f"sqlite:///{tmp_path / 'target.db'}"
    engine = global_state_app(source)
    async with engine:
        await (await engine.start("export.set_global")).result(timeout=DEADLINE)
        await anyio.sleep(0.1)  # "short" has expired
    into = ss.Engine(target, workers=0)
    try:
        report = await export_log(engine.store, into.store.backend)
        assert report.verified, report.mismatches
        assert report.global_entries == 3
        now = engine.clock.now_ms()
        for key in ("plan", "session", "counter"):
            original = await engine.store.backend.kv_get(key, now)
            copied = await into.store.backend.kv_get(key, now)
            assert original is not None
            assert copied is not None
            assert (copied.data, copied.expires_ms) == (original.data, original.expires_ms)
        assert await into.store.backend.kv_get("short", now) is None
        with pytest.raises(ss.UsageError, match="already holds events or global state"):
            await export_log(engine.store, into.store.backend)
    finally:
        await into.aclose()
        await engine.aclose()
    copy = global_state_app(target)
    async with copy:
        handle = await copy.start("export.read_global")
        assert await handle.result(timeout=DEADLINE) == {
            "plan": {"tier": "gold"},
            "session": "open",
            "short": None,
            "counter": 6,
        }


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # NATS runs on asyncio
async def test_a_target_holding_global_state_behind_an_expired_entry_is_refused(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The emptiness check read one page of one entry: a NATS bucket whose first message
    has expired gives an empty first page, and the export wrote into a target holding
    state, overwrote its keys, then reported a mismatch."""
    source = ss.Engine(f"sqlite:///{tmp_path / 'source.db'}", workers=0)
    target = ss.Engine(f"{nats_server.url}?stream=HELD{os.getpid()}{tmp_path.name[-6:]}", workers=0)
    backend = target.store.backend
    try:
        await backend.open()
        now = target.clock.now_ms()
        await backend.kv_put("gone", b"old", now - 10_000, ttl_ms=1)  # expired: first in line
        await backend.kv_put("precious", b"theirs", now)
        with pytest.raises(ss.UsageError, match="already holds events or global state"):
            await export_log(source.store, backend, now_ms=now)
        entry = await backend.kv_get("precious", now)
        assert entry is not None
        assert entry.data == b"theirs"
        assert await backend.max_position() == 0
    finally:
        await target.aclose()
        await source.aclose()
