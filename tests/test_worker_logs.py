"""A real `stepsource worker` process's log lines: one INFO line per execution start, end,
retry and takeover with the ids bound, `ctx.log` lines (silent while replaying), the text and
JSON formats and the level option (`--log-level`, `--log-format`).

Two worker processes share a SQLite file: the first (JSON lines) runs a step that fails once
and a step that it holds inside a sub-step until the test SIGKILLs it; the second (text lines)
takes the held execution over once the lease expires, replays it and finishes it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stepsource.testing.processes import eventually

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import log_app  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
DEADLINE = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Worker:
    def __init__(self, folder: Path, name: str, url: str, *args: str, **env: str) -> None:
        self.err = folder / f"{name}.err"
        self.out = folder / f"{name}.out"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
        environment.pop("LOG_APP_HOLD", None)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(TESTS_DIR), environment.get("PYTHONPATH")])
        )
        environment.update(env)
        command = [sys.executable, "-m", "stepsource", "--url", url, "worker", "log_app:engine"]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [*command, "--lease-seconds", "1", *args],
                env=environment,
                stdout=out,
                stderr=err,
                cwd=folder,
            )

    def lines(self) -> list[str]:
        return self.err.read_text(errors="replace").splitlines() if self.err.exists() else []

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines() if line.startswith("{")]

    async def printed(self, text: str) -> None:
        async def found() -> bool:
            return any(text in line for line in self.lines())

        await eventually(f"{text!r} in the log of {self.err.name}", found, timeout=DEADLINE)


@pytest.fixture
def spawned() -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(timeout=DEADLINE)


async def test_worker_logs_starts_ends_retries_and_takeovers(
    tmp_path: Path, spawned: list[Worker]
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    client = log_app.engine.derive(url=url, workers=0)
    first = Worker(tmp_path, "first", url, "--log-format", "json", LOG_APP_HOLD="1")
    spawned.append(first)
    flaky = await client.start("log.flaky", {"n": 7})
    assert await flaky.result(timeout=DEADLINE) == {"n": 7}
    held = await client.start("log.held")
    await first.printed("held handler began")

    async def recorded_before_the_body() -> bool:
        # the log line and ctx.now() are committed before the held body runs: a kill before
        # that commit would rightly run (and log) the handler's start again
        return any(
            type(e).__name__ == "ValueRecorded" for e in await client.events(held.execution_id)
        )

    await eventually("ctx.now() recorded", recorded_before_the_body, timeout=DEADLINE)

    lines = first.json_lines()
    mine = [x for x in lines if x.get("execution_id") == flaky.execution_id]
    events = [x["event"] for x in mine if x["logger"] == "stepsource.worker"]
    assert events == ["started", "retry", "retry-started", "completed"]
    for line in mine:
        assert line["step_id"] == "log.flaky"
        assert line["level"] in ("INFO", "WARNING")
    retry = next(x for x in mine if x.get("event") == "retry")
    assert "ConnectionError" in retry["message"]
    assert retry["attempt"] == 1
    # ctx.log lines carry the execution's ids and the metadata, on the documented logger
    said = [x for x in mine if x["logger"] == "stepsource.step"]
    assert [x["metadata"] for x in said] == [{"n": 7, "attempt": 1}, {"n": 7, "attempt": 2}]
    assert all(x["message"] == "flaky handler running" for x in said)
    started = next(x for x in lines if x.get("event") == "started")
    worker_id = started["worker_id"]

    # the first worker dies holding the execution; the second takes it over after the lease
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=DEADLINE)
    second = Worker(tmp_path, "second", url, "--log-level", "info")
    spawned.append(second)
    assert await client.get_handle(held.execution_id).result(timeout=DEADLINE) == {"released": True}
    await second.printed(f"execution {held.execution_id} (log.held) completed")
    text = "\n".join(second.lines())
    assert f"execution {held.execution_id} (log.held) attempt 1 taken over by worker " in text
    assert f"from worker {worker_id} (lost)" in text
    # the replay does not repeat what the first worker logged; what runs anew is logged
    assert "held handler began" not in text
    assert "held handler released" in text
    assert f"execution_id={held.execution_id}" in text  # ctx.log lines name the execution
    await client.aclose()


async def test_log_level_warning_keeps_execution_lines_out(
    tmp_path: Path, spawned: list[Worker]
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    client = log_app.engine.derive(url=url, workers=0)
    quiet = Worker(tmp_path, "quiet", url, "--log-level", "WARNING")
    spawned.append(quiet)
    handle = await client.start("log.flaky", {"n": 1})
    assert await handle.result(timeout=DEADLINE) == {"n": 1}
    quiet.proc.send_signal(signal.SIGTERM)
    assert quiet.proc.wait(timeout=DEADLINE) == 0
    assert not [line for line in quiet.lines() if handle.execution_id in line]
    await client.aclose()
    await anyio.lowlevel.checkpoint()


async def test_a_worker_warns_while_sqlite_stays_locked_and_when_it_answers_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "steps.db"
    engine = log_app.engine.derive(url=f"sqlite:///{path}?busy_timeout=50", workers=1)
    engine.poll_interval = 0.02
    caplog.set_level(logging.WARNING, logger="stepsource")

    def said(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records if r.name == "stepsource.worker")

    async with engine:
        holder = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction

            async def unavailable() -> bool:
                return said("the backend is unavailable")

            await eventually("the outage warning", unavailable, timeout=DEADLINE)
            holder.execute("ROLLBACK")
        finally:
            holder.close()

        async def answers() -> bool:
            return said("the backend answers again")

        await eventually("the recovery warning", answers, timeout=DEADLINE)
        handle = await engine.start("log.flaky", {"n": 2})
        assert await handle.result(timeout=DEADLINE) == {"n": 2}
    await engine.aclose()
