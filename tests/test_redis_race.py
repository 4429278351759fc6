"""Two OS processes race on a real redis-server: to append to one execution at the same
version (200 rounds: exactly one winner each round, the other gets a typed
VersionConflictError, the log holds exactly the winners' events), and to lease the same
queue (every execution leased by exactly one of them)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepsource.adapters.contract import enqueue, make_commit
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.adapters.redis.options import parse_redis_url
from stepsource.testing.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)

ROUNDS = 200
QUEUED = 200

# Each racer connects, says "ready", then for every line on stdin (the barrier: the test
# writes the same line to both racers at once) answers it: "append ROUND" appends one event
# at version ROUND ("ROUND win" or "ROUND conflict"); "lease" leases up to 7 executions
# until none is left and prints the ids it got. Anything else it raises ends it with a
# traceback.
_RACER = """
import sys, anyio
from stepsource.adapters.contract import make_commit
from stepsource.adapters.redis.backend import RedisBackend
from stepsource.errors import VersionConflictError

url, name = sys.argv[1], sys.argv[2]

async def main():
    backend = RedisBackend.from_url(url)
    await backend.open()
    print("ready", flush=True)
    while line := await anyio.to_thread.run_sync(sys.stdin.readline):
        command, *rest = line.split()
        if command == "append":
            round_ = int(rest[0])
            try:
                await backend.append(make_commit("race", round_, 1, data=name.encode()))
            except VersionConflictError as exc:
                assert exc.execution_id == "race", exc
                print(round_, "conflict", flush=True)
            else:
                print(round_, "win", flush=True)
        else:
            got = []
            while leases := await backend.lease(name, ["step"], 0, 60_000, 7):
                got += [lease.stream_id for lease in leases]
            print(" ".join(["leased", *got]), flush=True)
    await backend.aclose()

anyio.run(main)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("race")) as server:
        yield server


@pytest.fixture(scope="module")
def url(redis_server: RedisServer) -> str:
    return f"{redis_server.url}?prefix=RACE{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def racers(url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Racers]:
    """Both racers, started once for this module's tests (starting Python is the slow part)."""
    started = _Racers(url, tmp_path_factory.mktemp("racers"))
    yield started
    assert started.close() == [0, 0]


class _Racers:
    def __init__(self, url: str, cwd: Path) -> None:
        self.procs = {
            name: subprocess.Popen(
                [sys.executable, "-c", _RACER, url, name],
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in ("p1", "p2")
        }
        for proc in self.procs.values():
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"

    def ask(self, line: str) -> dict[str, list[str]]:
        for proc in self.procs.values():  # release both at once
            assert proc.stdin is not None
            proc.stdin.write(f"{line}\n")
            proc.stdin.flush()
        answers = {}
        for name, proc in self.procs.items():
            assert proc.stdout is not None
            answers[name] = proc.stdout.readline().split()
        return answers

    def close(self) -> list[int]:
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        codes = [proc.wait(timeout=30) for proc in self.procs.values()]
        for proc in self.procs.values():
            if proc.stdout is not None:
                proc.stdout.close()
        return codes


@pytest.mark.anyio
async def test_two_processes_race_on_one_version(
    url: str, racers: _Racers, anyio_backend: str
) -> None:
    outcomes: dict[str, list[str]] = {name: [] for name in racers.procs}
    for round_ in range(ROUNDS):
        for name, answer in racers.ask(f"append {round_}").items():
            assert answer[:1] == [str(round_)], f"{name} answered {answer}"
            outcomes[name].append(answer[1])
    for round_ in range(ROUNDS):  # exactly one winner and one typed conflict each round
        assert sorted(outcomes[name][round_] for name in outcomes) == ["conflict", "win"]
    backend = RedisBackend.from_url(url)
    events = await backend.read_stream("race")
    assert [event.version for event in events] == list(range(1, ROUNDS + 1))
    winners = [next(n for n in outcomes if outcomes[n][r] == "win") for r in range(ROUNDS)]
    assert [event.data.decode() for event in events] == winners  # none lost or duplicated
    assert len(await backend.read_all(0, 10 * ROUNDS)) == ROUNDS
    await backend.aclose()


@pytest.mark.anyio
async def test_two_processes_lease_one_queue(url: str, racers: _Racers, anyio_backend: str) -> None:
    backend = RedisBackend(parse_redis_url(url))
    for n in range(QUEUED):
        await backend.append(make_commit(f"x{n}", 0, queue=enqueue("step", priority=n % 3)))
    answers = racers.ask("lease")
    got = {name: answer[1:] for name, answer in answers.items()}
    assert all(answer[0] == "leased" for answer in answers.values())
    everything = got["p1"] + got["p2"]
    assert sorted(everything) == sorted(f"x{n}" for n in range(QUEUED))  # each exactly once
    assert await backend.lease("p3", ["step"], 0, 60_000, 10) == []
    await backend.aclose()
