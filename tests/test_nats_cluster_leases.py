"""The lease check of a commit on a three-node JetStream cluster (streams with 3 replicas):
the queue mirror's catch-up may be read from a replica that lags, so the stream leader
confirms it before a commit relies on it, and a zombie is refused as on one server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from stepsource.adapters.contract import enqueue, make_commit
from stepsource.adapters.nats import NatsBackend
from stepsource.errors import VersionConflictError
from stepsource.testing.nats_server import NatsCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as started:
        yield started


@pytest.mark.anyio
async def test_a_takeover_refuses_the_zombie_on_replicas(
    cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{cluster.url}?stream=LEASES&replicas=3"
    zombie, taker = NatsBackend.from_url(url), NatsBackend.from_url(url)
    streams = [f"s{n}" for n in range(12)]
    for stream in streams:
        await zombie.append(make_commit(stream, 0, queue=enqueue("step")))
    assert len(await zombie.lease("w1", ["step"], 0, 100, len(streams))) == len(streams)
    confirmed: list[bool] = []
    real = zombie.queue.catch_up

    async def recorded() -> bool:
        confirmed.append(await real())
        return confirmed[-1]

    monkeypatch.setattr(zombie.queue, "catch_up", recorded)
    for stream in streams:
        await zombie.append(make_commit(stream, 1, lease_owner="w1"))
    assert any(confirmed)  # the leader confirmed catch-ups: the mirror answered
    taken = {lease.stream_id for lease in await taker.lease("w2", ["step"], 101, 100, 6)}
    assert len(taken) == 6
    refused: set[str] = set()

    async def commit(stream: str) -> None:
        try:
            await zombie.append(make_commit(stream, 2, lease_owner="w1"))
        except VersionConflictError:
            refused.add(stream)

    async with anyio.create_task_group() as group:
        for stream in streams:
            group.start_soon(commit, stream)
    assert refused == taken
    for stream in streams:
        assert await taker.stream_version(stream) == (2 if stream in taken else 3)
    await zombie.aclose()
    await taker.aclose()
