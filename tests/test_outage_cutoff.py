"""The lost-worker cutoff counts dead workers, not backend outages (engine/outages.py).

A worker cut off from its backend stops like a dead one: its commit fails, its lease lapses
and the execution is taken over once the backend answers. Five takeovers in a row with no
progress fail an execution ("worker lost"), so a backend that goes away five times while a
long ``ctx.do`` body runs would fail a healthy execution. Here the backend is a real SQLite
file locked by another process holding a write transaction, and the dead worker a real
``stepsource worker`` process SIGKILLed again and again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.cli_inspect import takeovers
from stepsource.engine.actor import MAX_LOST_WORKERS
from stepsource.testing.nats_server import NatsServer
from stepsource.testing.processes import KILL_AT_ENV, WorkerProcesses, eventually

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import worker_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(180)]

DEADLINE = 30.0

#: another process holding SQLite's write lock until a line arrives on its stdin
_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class WriteLock:
    """The database's write lock, held by another process for as long as the ``async with``
    (started and stopped in a thread: the worker's event loop goes on meanwhile)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[str] | None = None

    def _take(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def _give_back(self) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        assert self.proc.wait(timeout=DEADLINE) == 0
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    async def __aenter__(self) -> WriteLock:
        await anyio.to_thread.run_sync(self._take)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self._give_back)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real processes: the client's event loop does not matter


async def _types(engine: ss.Engine, execution_id: str) -> list[str]:
    return [type(e).__name__ for e in await engine.events(execution_id)]


async def test_takeovers_after_backend_outages_do_not_count_as_lost_workers(
    tmp_path: Path,
) -> None:
    """More outages than the cutoff allows, each while a ctx.do body runs: each time the
    body's commit fails, the lease lapses and the worker takes the execution over again once
    the lock is gone; the execution completes, and the log says why each takeover was
    excused."""
    path = tmp_path / "outage.db"
    engine = ss.Engine(
        f"sqlite:///{path}?busy_timeout=200", workers=1, lease_seconds=1.0, poll_interval=0.05
    )
    runs: list[anyio.Event] = []

    async def body() -> str:
        gate = anyio.Event()
        runs.append(gate)
        await gate.wait()
        return f"ran {len(runs)} times"

    @engine.step("outage.long")
    async def long_body(ctx: ss.StepContext) -> str:
        result: str = await ctx.do("work", body)
        return result

    rounds = MAX_LOST_WORKERS + 1
    async with engine:
        handle = await engine.start("outage.long", {})

        async def body_runs(count: int) -> None:
            async def probe() -> bool:
                if len(runs) >= count:
                    return True
                record = await engine.describe(handle.execution_id)
                assert record.status not in ("failed", "completed"), record
                return False

            await eventually(f"the body to run {count} times", probe, timeout=DEADLINE)

        for n in range(1, rounds + 1):
            await body_runs(n)
            async with WriteLock(path):
                runs[-1].set()  # the body returns while the backend refuses every write
                # the commit of its result fails; the worker's lease lapses meanwhile
                await anyio.sleep(1.5)
        await body_runs(rounds + 1)
        runs[-1].set()
        assert await handle.result(timeout=DEADLINE) == f"ran {rounds + 1} times"
        types = await _types(engine, handle.execution_id)
        events = await engine.events(handle.execution_id)
    # every outage cost one takeover, each excused in the same commit as its StepLeased
    assert types.count("StepLeased") == rounds + 1
    assert types.count("BackendOutage") == rounds
    for i, event in enumerate(events):
        if isinstance(event, ev.BackendOutage):
            assert type(events[i - 1]) is ev.StepLeased
            assert event.unreachable_ms >= event.since_ms
    assert types[-1] == "StepCompleted"
    # `stepsource history` marks each of these takeovers as one that followed an outage
    assert [entry.details.get("outage") for entry in takeovers(events)] == [True] * rounds


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        f"sqlite:///{tmp_path / 'killed.db'}",
        "worker_app:engine",
        pythonpath=[TESTS_DIR],
        drop=(KILL_AT_ENV, "STEPSOURCE_URL", "WORKER_APP_BLOCK"),
        workers=1,
        lease_seconds=2,  # a renewal interval (the slow-call bound) well above a loaded fsync
    ) as pool:
        yield pool


async def test_a_worker_killed_again_and_again_still_hits_the_cutoff(
    tmp_path: Path, workers: WorkerProcesses
) -> None:
    """The other side of the rule: with the backend answering throughout, a worker SIGKILLed
    inside the same ctx.do body each time is a dead worker; the cutoff fails the execution
    and no takeover is excused."""
    client = worker_app.engine.derive(url=workers.url, workers=0)
    effects = tmp_path / "effects.txt"
    try:
        handle = await client.start("wp.blocking", {"effects": str(effects)})

        async def waits(count: int) -> bool:
            lines = effects.read_text().splitlines() if effects.exists() else []
            return lines.count("wait") >= count

        for n in range(1, MAX_LOST_WORKERS + 1):
            worker = workers.spawn(f"doomed-{n}", env={"WORKER_APP_BLOCK": "async"})
            await eventually(f"body run {n}", lambda n=n: waits(n), worker)  # type: ignore[misc]
            worker.proc.kill()
            assert await worker.exited() < 0
        last = workers.spawn("last", env={"WORKER_APP_BLOCK": "async"})
        with pytest.raises(ss.StepFailedError, match=f"lost {MAX_LOST_WORKERS} times in a row"):
            await handle.result(timeout=DEADLINE)
        assert (await client.describe(handle.execution_id)).status == "failed", last.output()
        types = await _types(client, handle.execution_id)
        assert "BackendOutage" not in types
        assert types.count("StepLeased") == MAX_LOST_WORKERS + 1
    finally:
        await client.aclose()


async def test_a_takeover_after_calls_that_waited_out_an_outage_does_not_count(
    tmp_path: Path, workers: WorkerProcesses
) -> None:
    """A backend may ride an outage out inside its calls (SQLite waits for another
    process's lock up to its busy timeout; NATS retries until its operation timeout): no
    call fails, but leases lapse meanwhile. Here the takeover is by a worker that only saw
    its lease calls hang for a renewal interval while another process held the write lock;
    that counts as an outage too (the holder, SIGKILLed during it, is the documented limit:
    a worker that dies during an outage is excused as well)."""
    client = worker_app.engine.derive(url=workers.url, workers=0)
    effects = tmp_path / "effects.txt"
    path = Path(workers.url.removeprefix("sqlite:///"))
    try:
        handle = await client.start("wp.blocking", {"effects": str(effects)})
        holder = workers.spawn("holder", env={"WORKER_APP_BLOCK": "async"})

        async def waiting() -> bool:
            return effects.exists() and "wait" in effects.read_text().splitlines()

        await eventually("the holder's body to run", waiting, holder)
        # the worker that takes over: in this process, its calls never fail (30 s busy timeout)
        taker = worker_app.engine.derive(url=workers.url, workers=1, lease_seconds=2)
        async with taker:
            await anyio.sleep(0.5)  # its first lease calls answered (the first one connects)
            async with WriteLock(path):
                holder.proc.kill()
                await anyio.sleep(3.0)  # the taker's lease calls wait; the lease lapses
            result = await handle.result(timeout=DEADLINE)
            types = await _types(taker, handle.execution_id)
            events = await taker.events(handle.execution_id)
        assert result == {"first": 9, "opened": "opened", "second": 16}
    finally:
        await client.aclose()
    assert await holder.exited() < 0
    [outage] = [e for e in events if isinstance(e, ev.BackendOutage)]
    assert outage.worker_id != events[1].worker_id  # type: ignore[attr-defined]
    assert types.count("StepLeased") == 2


async def test_a_takeover_after_a_nats_server_restart_does_not_count(tmp_path: Path) -> None:
    """The same on a real nats-server, SIGKILLed and restarted: the NATS backend waits an
    outage out inside its calls (it retries until its operation timeout), so the worker that
    takes over after the restart saw its lease calls hang, not fail."""
    with NatsServer(tmp_path / "nats", sync_interval="always") as server:
        url = f"{server.url}?stream=OUTAGE"
        client = worker_app.engine.derive(url=url, workers=0)
        effects = tmp_path / "effects.txt"
        with WorkerProcesses(
            tmp_path,
            url,
            "worker_app:engine",
            pythonpath=[TESTS_DIR],
            drop=(KILL_AT_ENV, "STEPSOURCE_URL", "WORKER_APP_BLOCK"),
            workers=1,
            lease_seconds=2,
        ) as pool:
            try:
                handle = await client.start("wp.blocking", {"effects": str(effects)})
                holder = pool.spawn("holder", env={"WORKER_APP_BLOCK": "async"})

                async def waiting() -> bool:
                    return effects.exists() and "wait" in effects.read_text().splitlines()

                await eventually("the holder's body to run", waiting, holder)
                taker = worker_app.engine.derive(url=url, workers=1, lease_seconds=2)
                async with taker:
                    await anyio.sleep(0.5)  # its first lease calls answered
                    server.kill()
                    holder.proc.kill()  # its lease lapses during the outage
                    await anyio.sleep(3.0)
                    server.start()
                    result = await handle.result(timeout=60)
                    events = await taker.events(handle.execution_id)
                assert result == {"first": 9, "opened": "opened", "second": 16}
            finally:
                await client.aclose()
    leased = [e for e in events if isinstance(e, ev.StepLeased)]
    assert len(leased) == 2
    [outage] = [e for e in events if isinstance(e, ev.BackendOutage)]
    assert outage.worker_id == leased[1].worker_id != leased[0].worker_id
