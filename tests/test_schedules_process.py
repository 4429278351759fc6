"""The schedules' proof: a one-second cron served by three ``stepsource worker`` processes,
one of them SIGKILLed midway (the one running the schedule, when it can be told), starts
exactly one execution per slot, with no slot missing, on SQLite and on NATS.

``make test`` runs it for a few seconds per backend; STEPSOURCE_SCHEDULE_PROOF_SECONDS=10 (or
more) runs the longer scenario."""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from stepsource.testing.nats_server import NatsServer
from stepsource.testing.processes import KILL_AT_ENV, WorkerProcess, WorkerProcesses, eventually

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import continue_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(240)]

SECONDS = float(os.environ.get("STEPSOURCE_SCHEDULE_PROOF_SECONDS", "5"))
DEADLINE = 60.0
PREFIX = "schedule:proof@"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        return f"{server.url}?stream=S{uuid.uuid4().hex[:16]}"
    return f"sqlite:///{tmp_path / 'steps.db'}"


@pytest.fixture
def workers(tmp_path: Path, url: str) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        url,
        "continue_app:engine",
        pythonpath=[TESTS_DIR],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL"),
        env={"SCHED_APP_RUNS": str(tmp_path / "runs.txt")},
    ) as pool:
        yield pool


def victim(processes: list[WorkerProcess], worker_id: str | None) -> WorkerProcess:
    """The process whose worker id (host:pid:...) is ``worker_id``, else the last one."""
    for process in processes:
        if worker_id is not None and f":{process.pid}:" in worker_id:
            return process
    return processes[-1]


async def test_a_one_second_cron_starts_exactly_one_execution_per_slot_through_a_kill(
    workers: WorkerProcesses, tmp_path: Path
) -> None:
    processes = [workers.spawn(f"w{i}") for i in range(3)]
    for process in processes:
        await process.ready()
    client = continue_app.engine.derive(url=workers.url, workers=0)
    async with client:
        schedule = await client.schedule(
            "proof", "sched.tick", cron="* * * * * *", overlap="allow", catch_up=120
        )
        await anyio.sleep(SECONDS / 2)
        run = await client.describe(await schedule.current_run())
        killed = victim(processes, run.worker_id)
        killed.proc.kill()  # SIGKILL: its leases lapse after a second
        await anyio.sleep(SECONDS / 2)
        await schedule.pause()

        async def all_done() -> bool:
            rows = await client.executions(step_id="sched.tick", limit=1000)
            return bool(rows) and all(row.status == "completed" for row in rows)

        survivors = [p for p in processes if p is not killed]
        await eventually("every slot's execution to complete", all_done, *survivors)
        rows = await client.executions(step_id="sched.tick", limit=1000)
        history = await schedule.history(limit=1000)
        for process in survivors:
            await process.terminate()
    await client.aclose()

    keys = Counter(row.key or "" for row in rows)
    assert all(key.startswith(PREFIX) for key in keys)
    assert all(n == 1 for n in keys.values())  # one execution per slot key (by construction)
    slots = sorted(int(datetime.fromisoformat(k[len(PREFIX) :]).timestamp()) for k in keys)
    # no slot missing between the first and the last: one execution for every second
    assert slots == list(range(slots[0], slots[-1] + 1)), slots
    assert len(slots) >= SECONDS - 2
    fired = [entry for entry in history if entry.type == "fired"]
    assert sorted(str(entry.execution_id) for entry in fired) == sorted(
        r.execution_id for r in rows
    )
    assert len({entry.slot for entry in fired}) == len(fired)  # each slot fired once
    assert not [entry for entry in history if entry.type in ("missed", "skipped")]
    ran = set((tmp_path / "runs.txt").read_text().split())
    assert ran == {row.execution_id for row in rows}  # every started execution ran
