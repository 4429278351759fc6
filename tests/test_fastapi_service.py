"""examples/fastapi_service.py under a real uvicorn server on 127.0.0.1, driven over HTTP:
the app's lifespan runs the engine's workers, executions started by requests run and wait in
that process, an event sent over HTTP wakes one, and the typed receipt comes back. SIGTERM
shuts the server down cleanly, and what it recorded stays in the SQLite file.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

import stepsource as ss
from stepsource import stop_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEADLINE = 30.0

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes], Path]]:
    url = f"sqlite:///{tmp_path / 'service.db'}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
    env["STEPSOURCE_URL"] = url
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(EXAMPLES),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "fastapi_service:app",
            ],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(f"{base}/docs", timeout=1.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield base, url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)


def _wait_for_status(client: httpx.Client, execution_id: str, status: str) -> dict[str, object]:
    deadline = time.monotonic() + DEADLINE
    while True:
        body: dict[str, object] = client.get(f"/orders/{execution_id}").json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_the_service_starts_executions_and_reads_their_state_over_http(
    server: tuple[str, str, subprocess.Popen[bytes], Path],
) -> None:
    base, url, proc, log = server
    with httpx.Client(base_url=base, timeout=DEADLINE) as client:
        created = client.post("/orders", json={"order_id": "A1", "items": [3, 4]})
        assert created.status_code == 202, created.text
        execution_id = created.json()["execution_id"]

        waiting = _wait_for_status(client, execution_id, "waiting")
        assert waiting["state"] == {"status": "awaiting approval", "total": 7}
        not_yet = client.get(f"/orders/{execution_id}/receipt", params={"timeout": 0.1})
        assert not_yet.status_code == 202
        assert "did not finish" in not_yet.json()["error"]

        assert client.post(f"/orders/{execution_id}/approve", json={"by": "ann"}).status_code == 202
        receipt = client.get(f"/orders/{execution_id}/receipt")
        assert receipt.status_code == 200, receipt.text
        assert receipt.json() == {"order_id": "A1", "total": 7, "approved_by": "ann"}
        done = _wait_for_status(client, execution_id, "completed")
        assert done["output"] == {"order_id": "A1", "total": 7, "approved_by": "ann"}

        bad = client.post("/orders", json={"order_id": "A2", "items": "none"})
        assert bad.status_code == 422
        unknown = client.get("/orders/00000000-0000-4000-8000-000000000000")
        assert unknown.status_code == 404
        assert "no such execution" in unknown.json()["error"]
        ended = client.post(f"/orders/{execution_id}/approve", json={"by": "bob"})
        assert ended.status_code == 409
        assert "already ended" in ended.json()["error"]

    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts the app down, then exits by the signal it handled (or 0 in older versions)
    assert proc.wait(timeout=DEADLINE) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "Application startup complete" in text
    assert "Application shutdown complete" in text

    # the server's engine was the only worker, and the log outlives it
    async def recorded() -> str:
        engine = ss.Engine(url, workers=0)
        try:
            return (await engine.describe(execution_id)).status
        finally:
            await engine.aclose()

    assert anyio.run(recorded) == "completed"


def test_lifespan_takes_engines_only() -> None:
    with pytest.raises(ss.UsageError, match="takes one or more stepsource Engines"):
        ss.lifespan()


def test_a_lifespan_held_up_by_a_thread_body_says_which_execution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync ``ctx.do`` body cannot be interrupted: the application's shutdown waits for it.
    It waited without a word (a service hung on deploy and nothing said why); it names the
    execution every few seconds (0.1 s here) until the body returns."""
    monkeypatch.setattr(stop_report, "STOP_REPORT_SECONDS", 0.1)
    engine = ss.Engine(f"sqlite:///{tmp_path / 'app.db'}", poll_interval=0.01)
    entered, gate = threading.Event(), threading.Event()

    @engine.step("app.blocking")
    async def blocking(ctx: ss.StepContext) -> str:
        def hold() -> None:
            entered.set()
            gate.wait(30)

        await ctx.do("hold", hold)
        return "done"

    async def serve_then_stop() -> str:
        async with ss.lifespan(engine)(object()) as state:
            assert state["engine"] is engine
            handle = await engine.start("app.blocking")
            await anyio.to_thread.run_sync(entered.wait, 30)
        return str(handle.execution_id)

    async def main() -> str:
        async with anyio.create_task_group() as tg:
            ids: list[str] = []

            async def run() -> None:
                ids.append(await serve_then_stop())

            tg.start_soon(run)
            with anyio.fail_after(30):
                while "still stopping" not in caplog.text:
                    await anyio.sleep(0.02)
            gate.set()
        return ids[0]

    with caplog.at_level(logging.WARNING, logger="stepsource.worker"):
        execution_id = anyio.run(main)
    said = [r.getMessage() for r in caplog.records if "still stopping" in r.getMessage()]
    assert said
    assert f"ctx.do body of execution {execution_id} to return" in said[0]
    assert "kill timeout" in said[0]
