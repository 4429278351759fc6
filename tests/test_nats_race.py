"""Two OS processes race to append to one execution at the same version, 200 rounds, on a
real nats-server: each round exactly one append wins and the other gets a typed
VersionConflictError; the log holds exactly the winners' events."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.wire import NatsOptions
from stepsource.testing.nats_server import NatsServer

pytestmark = pytest.mark.timeout(120)

ROUNDS = 200

# Each racer connects, says "ready", then for every line "ROUND" on stdin (the barrier: the
# test writes the same round to both racers at once) appends one event at version ROUND and
# answers "ROUND win" or "ROUND conflict". Anything else it raises ends it with a traceback.
_RACER = """
import sys, anyio
from stepsource.adapters.contract import make_commit
from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.wire import parse_nats_url
from stepsource.errors import VersionConflictError

url, name = sys.argv[1], sys.argv[2]

async def main():
    backend = NatsBackend(parse_nats_url(url))
    await backend.open()
    print("ready", flush=True)
    while line := await anyio.to_thread.run_sync(sys.stdin.readline):
        round_ = int(line)
        try:
            await backend.append(make_commit("race", round_, 1, data=name.encode()))
        except VersionConflictError as exc:
            assert exc.execution_id == "race", exc
            print(round_, "conflict", flush=True)
        else:
            print(round_, "win", flush=True)
    await backend.aclose()

anyio.run(main)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("race")) as server:
        yield server


def _start(url: str, name: str, cwd: Path) -> subprocess.Popen[str]:
    racer = subprocess.Popen(
        [sys.executable, "-c", _RACER, url, name],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert racer.stdout is not None
    assert racer.stdout.readline().strip() == "ready"
    return racer


@pytest.mark.anyio
async def test_two_processes_race_on_one_version(
    nats_server: NatsServer, tmp_path: Path, anyio_backend: str
) -> None:
    stream = f"RACE{uuid.uuid4().hex[:8]}"
    url = f"{nats_server.url}?stream={stream}"
    racers = {name: _start(url, name, tmp_path) for name in ("p1", "p2")}
    outcomes: dict[str, list[str]] = {name: [] for name in racers}
    try:
        for round_ in range(ROUNDS):
            for racer in racers.values():  # release both at once
                assert racer.stdin is not None
                racer.stdin.write(f"{round_}\n")
                racer.stdin.flush()
            for name, racer in racers.items():
                assert racer.stdout is not None
                answer = racer.stdout.readline().split()
                assert answer[:1] == [str(round_)], f"{name} answered {answer}"
                outcomes[name].append(answer[1])
    finally:
        for racer in racers.values():
            if racer.stdin is not None:
                racer.stdin.close()
        codes = [racer.wait(timeout=30) for racer in racers.values()]
        for racer in racers.values():
            if racer.stdout is not None:
                racer.stdout.close()
    assert codes == [0, 0]
    for round_ in range(ROUNDS):  # exactly one winner and one typed conflict each round
        assert sorted(outcomes[name][round_] for name in racers) == ["conflict", "win"]
    wins = {name: outcomes[name].count("win") for name in racers}
    conflicts = {name: outcomes[name].count("conflict") for name in racers}
    assert sum(wins.values()) == ROUNDS
    assert sum(conflicts.values()) == ROUNDS

    backend = NatsBackend(NatsOptions((f"127.0.0.1:{nats_server.port}",), stream=stream))
    events = await backend.read_stream("race")
    assert [event.version for event in events] == list(range(1, ROUNDS + 1))
    authors = [event.data.decode() for event in events]
    winners = [next(n for n in racers if outcomes[n][r] == "win") for r in range(ROUNDS)]
    assert authors == winners  # every stored event is the round's winner's, none duplicated
    assert {name: authors.count(name) for name in racers} == wins
    assert len(await backend.read_all(0, 10 * ROUNDS)) == ROUNDS
    await backend.aclose()
