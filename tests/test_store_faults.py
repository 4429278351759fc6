"""Store faults survived, each with a clear StepsourceError when it cannot be.

**SQLITE_BUSY under contention from several processes.** Four worker processes append to
streams of their own and lease from one shared queue in one SQLite file while this process
holds the file's write lock (a raw ``BEGIN IMMEDIATE`` kept open until the workers have
answered). With ``?busy_timeout=50`` every write made under the lock fails with a
:class:`BackendUnavailableError` saying the file is locked and what to do; nothing of it is
written, no other error escapes, and each worker carries on once the lock is gone. With the
default busy timeout the same contention is waited out and every append lands.

**The ambiguous acknowledgement on NATS.** A proxy on 127.0.0.1 between the backend and
nats-server forwards a commit's publish, lets the server store it, swallows the
acknowledgement and cuts the connection: the backend reconnects and retries under the same
``Nats-Msg-Id``, and the commit is in the stream exactly once. The same with the server
SIGKILLed (and restarted from its store) between storing and acknowledging. When the server
dies and stays down, the append gives up within the backend's retry bound with a
:class:`BackendUnavailableError`, and the restarted server holds the commit once.
(``tests/test_backend_nats.py`` drops an acknowledgement inside the backend; here it is
lost on the wire, and the retries run out.)

No test here measures time: locks are held, and connections cut, until the other side has
been seen to act; every wait has a generous deadline, as a guard against hangs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from stepsource.adapters.contract_support import check_log, enqueue, make_commit
from stepsource.adapters.nats import NatsBackend
from stepsource.adapters.nats.wire import parse_nats_url
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.urls import open_backend
from stepsource.errors import BackendUnavailableError, StepsourceError, VersionConflictError
from stepsource.testing.nats_server import NatsServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only; the SQLite workers are processes anyway


# == SQLite: SQLITE_BUSY under contention from several processes ============================
WORKERS = 4
JOBS = 40

_WORKER = r"""
import json, sys
import anyio, anyio.to_thread
from stepsource.adapters.contract_support import make_commit
from stepsource.adapters.urls import open_backend
from stepsource.errors import StepsourceError

url, name = sys.argv[1], sys.argv[2]

def say(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

def failed(op, exc, **fields):
    return {"op": op, "ok": False, "error": type(exc).__name__, "message": str(exc), **fields}

async def main():
    backend = open_backend(url)
    await backend.open()
    version = attempts = 0
    say(ready=True)
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if not line.startswith("go "):
            break
        say(started=True)
        outcomes = []
        for _ in range(int(line.split()[1])):
            attempts += 1
            tag = f"{name}:{attempts}"
            try:  # the expected version moves only when an append is acknowledged
                await backend.append(make_commit(name, version, 2, data=tag.encode()))
            except StepsourceError as exc:
                outcomes.append(failed("append", exc, tag=tag))
            else:
                version += 2
                outcomes.append({"op": "append", "ok": True, "tag": tag})
            try:
                leases = await backend.lease(name, ["step"], 1, 10**9, 1)
            except StepsourceError as exc:
                outcomes.append(failed("lease", exc))
            else:
                leased = [lease.stream_id for lease in leases]
                outcomes.append({"op": "lease", "ok": True, "leased": leased})
        say(outcomes=outcomes)
    await backend.aclose()

anyio.run(main)
"""


@dataclass(eq=False)
class _Worker:
    """One worker process: commands on its stdin, one JSON object a line on its stdout."""

    name: str
    process: Process
    lines: BufferedByteReceiveStream
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(f"{command}\n".encode())

    async def receive(self, deadline: float = 60) -> dict[str, Any]:
        try:
            with anyio.fail_after(deadline):
                line = await self.lines.receive_until(b"\n", 1 << 22)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            raise AssertionError(f"{self.name} died: {await self._stderr()}") from None
        message: dict[str, Any] = json.loads(line)
        return message

    async def run(self, command: str) -> list[dict[str, Any]]:
        """Send ``go N`` and return the outcomes of its N rounds (also kept in outcomes)."""
        await self.send(command)
        assert await self.receive() == {"started": True}
        return await self.results()

    async def results(self) -> list[dict[str, Any]]:
        message = await self.receive()
        outcomes: list[dict[str, Any]] = message["outcomes"]
        self.outcomes += outcomes
        return outcomes

    async def _stderr(self) -> str:
        if self.process.stderr is None:
            return ""
        chunks = []
        with anyio.move_on_after(5):
            async for chunk in self.process.stderr:
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


@contextlib.asynccontextmanager
async def _workers(url: str, cwd: Path) -> AsyncIterator[list[_Worker]]:
    """WORKERS processes on ``url``, each ready (its backend open); on exit they are told to
    quit and must exit 0; whatever is left running is killed."""
    processes: list[Process] = []
    try:
        workers = []
        for n in range(WORKERS):
            command = [sys.executable, "-c", _WORKER, url, f"w{n}"]
            process = await anyio.open_process(command, cwd=cwd)
            processes.append(process)
            assert process.stdout is not None
            workers.append(_Worker(f"w{n}", process, BufferedByteReceiveStream(process.stdout)))
        for worker in workers:
            assert await worker.receive() == {"ready": True}
        yield workers
        for worker in workers:
            await worker.send("quit")
        for worker in workers:
            with anyio.fail_after(60):
                returncode = await worker.process.wait()
            assert returncode == 0, await worker._stderr()
    finally:
        with anyio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


@contextlib.contextmanager
def _write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's long write transaction, as SQLite sees it: a connection of its
    own holding the write lock (BEGIN IMMEDIATE) until the block ends."""
    holder = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
        holder.execute("ROLLBACK")
    finally:
        holder.close()


async def _file_with_jobs(path: Path) -> None:
    backend = SQLiteBackend(str(path))
    for n in range(JOBS):
        await backend.append(make_commit(f"job-{n}", 0, queue=enqueue("step")))
    await backend.aclose()


def _check_locked_error(outcome: dict[str, Any], path: Path, timeout_ms: int) -> None:
    assert outcome["ok"] is False, outcome
    assert outcome["error"] == "BackendUnavailableError", outcome
    message = outcome["message"]
    assert str(path) in message
    assert "locked" in message
    assert f"{timeout_ms} ms" in message
    assert "busy_timeout" in message  # what to do: raise it, or find the stuck writer


async def _check_nothing_half_written(path: Path, workers: list[_Worker]) -> None:
    """Every acknowledged append is there whole, in order, and nothing else is; every
    queue row leased is leased by the worker that was told so, and by no one else."""
    backend = SQLiteBackend(str(path))
    check_log(await backend.read_all(0, 100_000), commit_size=2)
    leased_by: dict[str, str] = {}
    for worker in workers:
        acked = [o["tag"] for o in worker.outcomes if o["op"] == "append" and o["ok"]]
        events = await backend.read_stream(worker.name)
        assert [e.version for e in events] == list(range(1, 2 * len(acked) + 1))
        assert [e.data.decode() for e in events] == [tag for tag in acked for _ in (1, 2)]
        for outcome in worker.outcomes:
            if outcome["op"] == "lease" and outcome["ok"]:
                for stream_id in outcome["leased"]:
                    assert stream_id not in leased_by, f"{stream_id} leased twice"
                    leased_by[stream_id] = worker.name
    await backend.aclose()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        owners = dict(conn.execute("SELECT stream_id, lease_owner FROM queue").fetchall())
    assert {job: owner for job, owner in owners.items() if owner is not None} == leased_by


@pytest.mark.slow
async def test_a_tiny_busy_timeout_fails_cleanly_under_a_held_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await _file_with_jobs(path)
    async with _workers(f"sqlite:///{path}?busy_timeout=50", tmp_path) as workers:
        # 1. the workers contend with one another: whatever fails, fails cleanly
        async with anyio.create_task_group() as group:
            for worker in workers:
                group.start_soon(worker.run, "go 10")
        for worker in workers:
            for outcome in worker.outcomes:
                if not outcome["ok"]:
                    _check_locked_error(outcome, path, 50)
        # 2. this process holds the write lock until every worker has answered: every
        #    append and lease fails, with the error that says what to do
        with _write_lock_held(path):
            for worker in workers:
                await worker.send("go 5")
            refused = []
            for worker in workers:
                assert await worker.receive() == {"started": True}
                refused.append(await worker.results())
        for outcomes in refused:
            assert len(outcomes) == 10
            for outcome in outcomes:
                _check_locked_error(outcome, path, 50)
        # 3. the lock is gone: each worker alone (no contention) appends and leases again,
        #    from the version it last had acknowledged (a refused append wrote nothing)
        for worker in workers:
            assert all(outcome["ok"] for outcome in await worker.run("go 3"))
    await _check_nothing_half_written(path, workers)


@pytest.mark.slow
async def test_the_default_busy_timeout_waits_out_the_same_contention(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    await _file_with_jobs(path)
    async with _workers(f"sqlite:///{path}", tmp_path) as workers:
        with _write_lock_held(path):
            for worker in workers:
                await worker.send("go 5")
            for worker in workers:
                assert await worker.receive() == {"started": True}
            for worker in workers:  # nothing can complete while the lock is held
                with anyio.move_on_after(0.5) as waited:
                    await worker.receive()
                assert waited.cancelled_caught
        for worker in workers:  # released: every waiting append and lease goes through
            assert all(outcome["ok"] for outcome in await worker.results())
        async with anyio.create_task_group() as group:  # and so does the free contention
            for worker in workers:
                group.start_soon(worker.run, "go 10")
        for worker in workers:
            assert len(worker.outcomes) == 30
            assert all(outcome["ok"] for outcome in worker.outcomes)
    await _check_nothing_half_written(path, workers)
    backend = SQLiteBackend(str(path))
    assert await backend.max_position() == JOBS + WORKERS * 15 * 2  # every append landed
    await backend.aclose()


async def test_reads_are_served_while_another_process_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.db"
    url = f"sqlite:///{path}?busy_timeout=50"
    backend = open_backend(url)
    await backend.append(make_commit("s", 0, 2))
    fresh = open_backend(url)  # say, `stepsource status` started during a long write
    try:
        with _write_lock_held(path):
            assert await backend.stream_version("s") == 2  # WAL: readers beside the writer
            with pytest.raises(BackendUnavailableError, match="locked"):
                await backend.append(make_commit("s", 2))
            assert await backend.stream_version("s") == 2
            assert [e.version for e in await fresh.read_stream("s")] == [1, 2]
    finally:
        await backend.aclose()
        await fresh.aclose()


# == NATS: the acknowledgement lost on the wire ==============================================
@dataclass(eq=False)
class _Link:
    """One client connection through the proxy, and its connection to the server."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    cutting: bool = False
    swallowed: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)  # all the client sent through it


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of nats-server that loses one acknowledgement.

    It forwards bytes both ways. After :meth:`arm`, the next publish to a subject starting
    with ``subject_prefix`` is forwarded to the server, and from then on that connection's
    server-to-client bytes are swallowed until the server's acknowledgement of a message
    stored in ``stream`` passes by (the server acknowledges only what it stored); then
    ``on_stored`` runs (blocking: nothing else in this process moves meanwhile) and both
    sides of the connection are aborted, so the client never sees the acknowledgement.
    :meth:`go_down` stops listening (a connection attempt is refused, as by a dead server's
    port); :meth:`come_back` listens again on the same port.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.cut = asyncio.Event()
        self.on_stored: Callable[[], None] = lambda: None
        self._marker = b""
        self._ack = b""
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()
        self._transcripts: list[bytearray] = []

    def msg_ids(self, start: str) -> list[list[str]]:
        """Per connection, in order: the ``Nats-Msg-Id`` headers published through it
        that begin with ``start``."""
        pattern = re.compile(rb"Nats-Msg-Id: (" + re.escape(start.encode()) + rb"[^\r]*)\r\n")
        return [[found.decode() for found in pattern.findall(sent)] for sent in self._transcripts]

    def arm(self, subject_prefix: str, stream: str) -> None:
        self._marker = f"PUB {subject_prefix}".encode()  # the HPUB of a commit
        self._ack = f'"stream":"{stream}","seq":'.encode()  # its PubAck

    async def start(self) -> CuttingProxy:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self

    def go_down(self) -> None:
        if self._listener is not None:
            self._listener.close()  # stops listening at once

    async def come_back(self) -> None:
        if self._listener is not None:
            await self._listener.wait_closed()
        await self.start()

    async def close(self) -> None:
        self.go_down()
        if self._listener is not None:
            await self._listener.wait_closed()
        for link in list(self._links):
            self._abort(link)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _abort(self, link: _Link) -> None:
        self._links.discard(link)
        for writer in (link.client, link.server):
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        self._transcripts.append(link.sent)
        for pump in (self._client_to_server(link, reader), self._server_to_client(link, up_reader)):
            task = asyncio.get_running_loop().create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _client_to_server(self, link: _Link, reader: asyncio.StreamReader) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if self._marker and self._marker in tail + chunk:
                    link.cutting = True  # before forwarding: the ack cannot overtake this
                    self._marker = b""
                tail = chunk[-64:]
                link.sent += chunk
                link.server.write(chunk)
                await link.server.drain()
        self._abort(link)

    async def _server_to_client(self, link: _Link, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if not link.cutting:
                    link.client.write(chunk)
                    await link.client.drain()
                    continue
                link.swallowed += chunk
                if self._ack in link.swallowed:  # stored; the client will never know
                    self.on_stored()
                    self._abort(link)
                    self.cut.set()
                    return
        self._abort(link)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")  # sync_interval: always, so a kill keeps the acked
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[CuttingProxy]:
    proxy = await CuttingProxy(nats_server.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def _tenant() -> str:
    return f"F{uuid.uuid4().hex[:12]}"


async def _stored_commits(server: NatsServer, stream: str, execution: str) -> list[list[int]]:
    """The versions of each message stored for ``execution``, read from the server
    directly (not through the proxy); the whole log checked on the way."""
    direct = open_backend(f"{server.url}?stream={stream}")
    try:
        events = await direct.read_all(0, 10_000)
    finally:
        await direct.aclose()
    check_log(events)
    by_message: dict[int, list[int]] = {}
    for event in events:
        if event.stream_id == execution:
            by_message.setdefault(event.position // 1024, []).append(event.version)
    return list(by_message.values())


async def _connected(proxy: CuttingProxy, stream: str, **timeouts: float) -> NatsBackend:
    """A backend reaching the server through the proxy, its streams created and the
    execution ``job`` at version 2."""
    backend = NatsBackend(parse_nats_url(f"nats://127.0.0.1:{proxy.port}?stream={stream}"))
    if timeouts:
        backend = NatsBackend(backend.options, **timeouts)
    await backend.append(make_commit("job", 0, 2))
    return backend


async def test_an_ack_lost_with_the_connection_is_retried_by_msg_id_without_a_duplicate(
    nats_server: NatsServer, proxy: CuttingProxy
) -> None:
    stream = _tenant()
    backend = await _connected(proxy, stream)
    proxy.arm(f"{stream}.ev.", stream)
    with anyio.fail_after(90):  # a guard against a hang, not a measurement
        position = await backend.append(make_commit("job", 2, 3))
    assert proxy.cut.is_set()  # stored, and its ack never reached the client
    first, *retries = [ids for ids in proxy.msg_ids("job:3:") if ids]
    assert retries  # the retry went over a new connection, under the same Nats-Msg-Id
    assert {msg_id for ids in [first, *retries] for msg_id in ids} == {first[0]}
    assert await _stored_commits(nats_server, stream, "job") == [[1, 2], [3, 4, 5]]
    assert (await backend.read_stream("job"))[-1].position == position
    assert await backend.stream_version("job") == 5
    with pytest.raises(VersionConflictError):  # a real conflict is still one
        await backend.append(make_commit("job", 2, 1))
    assert await backend.append(make_commit("job", 5)) > position  # and the log goes on
    assert await _stored_commits(nats_server, stream, "job") == [[1, 2], [3, 4, 5], [6]]
    await backend.aclose()


async def test_an_ack_lost_to_a_server_kill_is_found_after_the_restart(
    nats_server: NatsServer, proxy: CuttingProxy
) -> None:
    """The server is SIGKILLed right after storing the commit (before its ack leaves) and
    restarted on its port and store; the retry under the same Nats-Msg-Id meets the
    restarted server, which must recognise the commit rather than store it again."""
    stream = _tenant()
    backend = await _connected(proxy, stream)

    def kill_and_restart() -> None:
        nats_server.kill()
        nats_server.start()

    proxy.on_stored = kill_and_restart
    proxy.arm(f"{stream}.ev.", stream)
    with anyio.fail_after(90):
        position = await backend.append(make_commit("job", 2, 3))
    assert proxy.cut.is_set()
    first, *retries = [ids for ids in proxy.msg_ids("job:3:") if ids]
    assert retries
    assert {msg_id for ids in [first, *retries] for msg_id in ids} == {first[0]}
    assert await _stored_commits(nats_server, stream, "job") == [[1, 2], [3, 4, 5]]
    assert (await backend.read_stream("job"))[-1].position == position
    await backend.aclose()


async def _append_while_the_server_stays_down(
    nats_server: NatsServer, proxy: CuttingProxy
) -> BackendUnavailableError:
    """The server dies right after storing a commit, its port refuses connections, and
    the append runs out of retries (their bound shortened to keep this quick). The server
    is restarted afterwards; the error is returned."""
    stream = _tenant()
    backend = await _connected(proxy, stream, request_timeout=0.5, operation_timeout=3.0)

    def die() -> None:
        nats_server.kill()
        proxy.go_down()

    proxy.on_stored = die
    proxy.arm(f"{stream}.ev.", stream)
    with anyio.fail_after(90), pytest.raises(BackendUnavailableError) as caught:
        await backend.append(make_commit("job", 2, 3))
    assert proxy.cut.is_set()
    await backend.aclose()
    await anyio.to_thread.run_sync(nats_server.start)
    assert await _stored_commits(nats_server, stream, "job") == [[1, 2], [3, 4, 5]]
    reader = open_backend(f"{nats_server.url}?stream={stream}")  # who reads the log knows
    assert await reader.stream_version("job") == 5
    with pytest.raises(VersionConflictError):  # and the same commit again is refused
        await reader.append(make_commit("job", 2, 3))
    await reader.aclose()
    return caught.value


async def test_retries_are_bounded_when_the_server_stays_down(
    nats_server: NatsServer, proxy: CuttingProxy
) -> None:
    error = await _append_while_the_server_stays_down(nats_server, proxy)
    assert type(error) is BackendUnavailableError
    assert isinstance(error, StepsourceError)
    assert f"127.0.0.1:{proxy.port}" in str(error)  # the server it could not reach
    assert error.hint  # and what to check


async def test_the_error_of_an_unknown_outcome_says_the_commit_may_be_stored(
    nats_server: NatsServer, proxy: CuttingProxy
) -> None:
    error = await _append_while_the_server_stays_down(nats_server, proxy)
    assert "may or may not be stored" in str(error)
    assert error.execution_id == "job"
    assert "Read the stream's version" in str(error)


async def test_a_short_outage_within_the_retry_bound_is_ridden_out(
    nats_server: NatsServer, proxy: CuttingProxy
) -> None:
    """The server dies right after storing the commit and is back 6 s later: well within
    the backend's retry bound (operation_timeout, 30 s), and long after nats-py's own
    reconnects (and one 0.5 s request timeout) have given up."""
    stream = _tenant()
    backend = await _connected(proxy, stream, request_timeout=0.5)

    def die() -> None:
        nats_server.kill()
        proxy.go_down()

    proxy.on_stored = die
    proxy.arm(f"{stream}.ev.", stream)
    outcome: list[int | BaseException] = []

    async def append() -> None:
        try:
            outcome.append(await backend.append(make_commit("job", 2, 3)))
        except StepsourceError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(append)
        await proxy.cut.wait()
        with anyio.move_on_after(6):  # the outage; it ends early if the append gave up
            while not outcome:
                await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(nats_server.start)
        await proxy.come_back()
    await backend.aclose()
    assert await _stored_commits(nats_server, stream, "job") == [[1, 2], [3, 4, 5]]
    assert len(outcome) == 1
    assert isinstance(outcome[0], int), outcome
