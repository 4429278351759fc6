"""A three-node JetStream cluster (routes on loopback, streams with 3 replicas) loses its
stream leader to SIGKILL in the middle of concurrent appends: the leader changes, the node
comes back, and afterwards every acknowledged event is readable, none is duplicated and no
execution has a gap in its versions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from stepsource.adapters.contract import make_commit
from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.wire import parse_nats_url
from stepsource.adapters.ports import RecordedEvent
from stepsource.errors import BackendUnavailableError, VersionConflictError
from stepsource.testing.nats_server import NatsCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

EXECUTIONS = 24
COMMITS = 50  # per execution: 1,200 appends in all
KILL_AFTER = 300  # acknowledged appends before the leader is killed


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as started:
        yield started


@dataclass
class Writers:
    """What the writers saw: each acknowledged append, logged by the writer itself."""

    acked: list[tuple[str, int, int, int]] = field(default_factory=list)  # stream, from, to, pos
    unsure: int = 0  # appends that ended without an answer (stored or not: the log decides)
    conflicts: int = 0  # appends refused because an unsure one had in fact been stored
    killed: bool = False  # set by the chaos task once the leader is SIGKILLed


async def _leader(backend: NatsBackend) -> str | None:
    info = await backend.stream_info()
    leader = (info.get("cluster") or {}).get("leader")
    return None if leader is None else str(leader)


async def _write(backend: NatsBackend, name: str, log: Writers) -> None:
    version = 0
    for commit_no in range(COMMITS):
        size = 1 + commit_no % 3
        while True:
            try:
                position = await backend.append(make_commit(name, version, size))
            except BackendUnavailableError:
                log.unsure += 1
            except VersionConflictError:
                log.conflicts += 1
            else:
                log.acked.append((name, version + 1, version + size, position))
                version += size
                if len(log.acked) >= KILL_AFTER and not log.killed:
                    # paced until the kill lands: on an idle machine the writers would
                    # otherwise finish before the leader is killed "in the middle"
                    await anyio.sleep(0.05)
                break
            while True:  # ask the log what it holds before writing again
                try:
                    version = await backend.stream_version(name)
                    break
                except BackendUnavailableError:
                    await anyio.sleep(0.1)


@pytest.mark.anyio
async def test_leader_killed_during_appends_loses_nothing(
    cluster: NatsCluster, anyio_backend: str
) -> None:
    url = f"{cluster.url}?stream=CLUSTER&replicas=3"
    backend = NatsBackend.from_url(url)
    await backend.open()
    assert (await backend.stream_info())["config"]["num_replicas"] == 3
    log = Writers()
    seen: dict[str, str | None] = {}

    async def chaos() -> None:
        watcher = NatsBackend(parse_nats_url(url))  # a connection of its own
        while len(log.acked) < KILL_AFTER:
            await anyio.sleep(0.01)
        leader = None
        while leader is None:
            leader = await _leader(watcher)
        seen["killed"] = leader
        victim = cluster.server(leader)
        victim.kill()
        log.killed = True
        seen["acked_at_kill"] = str(len(log.acked))
        deadline = time.monotonic() + 30
        new_leader = None
        while new_leader in (None, leader) and time.monotonic() < deadline:
            try:
                new_leader = await _leader(watcher)
            except BackendUnavailableError:
                new_leader = None
            await anyio.sleep(0.05)
        seen["new"] = new_leader
        await anyio.to_thread.run_sync(lambda: victim.start(wait=False))
        await watcher.aclose()

    async with anyio.create_task_group() as group:
        group.start_soon(chaos)
        for n in range(EXECUTIONS):
            group.start_soon(_write, backend, f"ex-{n}", log)

    assert seen["killed"] is not None
    assert seen["new"] is not None
    assert seen["new"] != seen["killed"], seen  # the leader changed
    assert int(seen["acked_at_kill"] or 0) < EXECUTIONS * COMMITS  # killed mid-run
    assert len(log.acked) == EXECUTIONS * COMMITS
    await anyio.to_thread.run_sync(cluster.server(seen["killed"]).wait_ready)

    # every acknowledged event is readable, with the position it was acknowledged at
    expected: dict[str, int] = {}
    for name, first, last, position in log.acked:
        expected[name] = max(expected.get(name, 0), last)
        events = await backend.read_stream(name, first, last)
        assert [e.version for e in events] == list(range(first, last + 1))
        assert events[-1].position == position
        assert [e.data for e in events] == [f"{name}:{v}".encode() for v in range(first, last + 1)]
    # no gaps (read_stream refuses one) and nothing beyond what the writers know of
    for name, last in expected.items():
        assert await backend.stream_version(name) == last
        assert [e.version for e in await backend.read_stream(name)] == list(range(1, last + 1))
    # none duplicated: the whole log holds each (execution, version) once
    total = sum(expected.values())
    everything: list[RecordedEvent] = []
    for _ in range(50):  # a replica that just came back may answer a page short: read again
        everything = []
        while page := await backend.read_all(everything[-1].position if everything else 0, 500):
            everything.extend(page)
        if len(everything) >= total:
            break
        await anyio.sleep(0.1)
    keys = [(e.stream_id, e.version) for e in everything]
    assert len(keys) == len(set(keys)) == total
    positions = [e.position for e in everything]
    assert positions == sorted(set(positions))
    await backend.aclose()
