"""Concurrency limits hold across real worker processes sharing one SQLite file or
one NATS JetStream server.

Three ``stepsource worker flowlimit_app:engine --workers 4`` processes (twelve slots in all)
run executions of steps limited to 2 at once, and to 1 at once per key. Every handler writes a
begin and an end line to one shared file; the most seen at once is asserted <= the limit and
> 1 where the limit allows more (so the test fails if the limit or the parallelism is lost).
"""

from __future__ import annotations

import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import stepsource as ss
from stepsource.testing.nats_server import NatsServer
from stepsource.testing.processes import WorkerProcesses

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import flowlimit_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "nats"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        return f"{server.url}?stream=F{uuid.uuid4().hex[:16]}"
    return f"sqlite:///{tmp_path / 'steps.db'}"


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        db_url,
        "flowlimit_app:engine",
        pythonpath=[TESTS_DIR],
        drop=("STEPSOURCE_URL",),
        workers=4,
        lease_seconds=1,
    ) as pool:
        yield pool


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[ss.Engine]:
    engine = flowlimit_app.engine.derive(url=db_url, workers=0)
    try:
        yield engine
    finally:
        await engine.aclose()


def most_at_once(lines: list[str]) -> Counter[str]:
    """The most executions seen running at once, per key (and over all of them: '*')."""
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    for line in lines:
        key = line.split()[1]
        step = 1 if line.startswith("+") else -1
        running[key] += step
        running["*"] += step
        most[key] = max(most[key], running[key])
        most["*"] = max(most["*"], running["*"])
    return most


async def test_a_concurrency_limit_holds_across_worker_processes(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    path = str(tmp_path / "marks.txt")
    for process in [workers.spawn(f"w{i}") for i in range(3)]:
        await process.ready()
    handles = [await client.start("flow.limited", {"path": path}) for _ in range(10)]
    for handle in handles:
        assert await handle.result(timeout=60) == "all"
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 20
    most = most_at_once(lines)
    assert 1 < most["*"] <= 2, lines


async def test_per_key_limits_isolate_keys(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    path = str(tmp_path / "marks.txt")
    for process in [workers.spawn(f"w{i}") for i in range(3)]:
        await process.ready()
    handles = [
        await client.start("flow.keyed", {"path": path, "group": group})
        for _ in range(4)
        for group in ("a", "b", "c")
    ]
    for handle in handles:
        await handle.result(timeout=60)
    lines = Path(path).read_text().splitlines()
    most = most_at_once(lines)
    assert most["a"] == most["b"] == most["c"] == 1, lines
    assert most["*"] > 1, lines  # keys do not wait for one another


async def test_a_sigkilled_workers_slot_frees_itself(
    tmp_path: Path, workers: WorkerProcesses, client: ss.Engine
) -> None:
    path = str(tmp_path / "marks.txt")
    handles = [await client.start("flow.single", {"path": path}) for _ in range(3)]
    # the first worker dies right after its first commit (StepLeased and StepStarted), while
    # it holds the step's only slot and never gives it back
    doomed = workers.spawn("doomed", kill_at="after-record:1")
    assert await doomed.exited() == -signal.SIGKILL
    heir = workers.spawn("heir")
    await heir.ready()
    for handle in handles:  # the slot's token lapsed with the dead worker's lease
        assert await handle.result(timeout=60) == "single"
    lines = Path(path).read_text().splitlines()
    assert most_at_once(lines)["single"] == 1, lines
