"""One execution cannot take a worker down: whatever goes wrong while running or finishing
it ends that attempt with a recorded failure naming the cause (bounded, valid text), and
the same ``stepsource worker`` process goes on serving the others."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepsource as ss
from stepsource.aggregates import events as ev
from stepsource.engine.failures import MAX_MESSAGE_BYTES, bounded_text
from stepsource.testing.processes import WorkerProcesses

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import isolation_app  # noqa: E402

pytestmark = pytest.mark.anyio

#: each bad kind and a word the recorded failure must contain (the real cause)
CAUSES = {
    "big-output": "payload limit",
    "deep-output": "nested deeper",
    "big-details": "payload limit",
    "huge-message": "yyyy",
    "surrogate-message": "half a pair",
    "child-task": "set_state",
    "sys-exit": "SystemExit: the handler called sys.exit",
    "own-cancelled": "CancelledError: raised by the handler",
    "body-exit": "with SystemExit: the body called sys.exit",
    "body-cancelled": "with CancelledError: raised by the body",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(
        tmp_path,
        f"sqlite:///{tmp_path / 'steps.db'}",
        "isolation_app:engine",
        pythonpath=[TESTS_DIR],
        drop=("STEPSOURCE_URL",),
    ) as pool:
        yield pool


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_worker_process_survives_every_bad_execution_and_serves_the_others(
    tmp_path: Path, workers: WorkerProcesses
) -> None:
    worker = workers.spawn("w1")
    await worker.ready()
    client = isolation_app.engine.derive(url=workers.url, workers=0)
    try:
        bad = {kind: await client.start("iso.bad", {"kind": kind}) for kind in CAUSES}
        for kind, handle in bad.items():
            with pytest.raises(ss.StepFailedError):
                await handle.result(timeout=30)
            events = await client.events(handle.execution_id)
            failed = [e for e in events if isinstance(e, ev.StepFailed)]
            assert len(failed) == 1, (kind, [type(e).__name__ for e in events])
            message = failed[0].reason
            assert CAUSES[kind] in message, (kind, message[:300])
            assert len(message.encode()) <= MAX_MESSAGE_BYTES + 100
            assert not [e for e in events if isinstance(e, ev.StepCompleted)]
            assert worker.running(), worker.output()
        good = await client.start("iso.ok", {"n": 21})
        assert await good.result(timeout=30) == 42
    finally:
        await client.aclose()
    assert worker.running(), worker.output()
    assert await worker.terminate() == 0, worker.output()
    assert "Traceback" not in worker.stderr_text(), worker.output()


@pytest.mark.parametrize("kind", sorted(CAUSES))
async def test_async_with_engine_never_raises_because_of_one_execution(kind: str) -> None:
    engine = isolation_app.engine.derive(url="memory://", workers=2, poll_interval=0.01)
    async with engine:
        handle = await engine.start("iso.bad", {"kind": kind})
        with pytest.raises(ss.StepFailedError, match=CAUSES[kind][:4]):
            await handle.result(timeout=20)
        assert await (await engine.start("iso.ok", {"n": 1})).result(timeout=20) == 2


def test_bounded_text_is_valid_utf8_and_bounded() -> None:
    assert bounded_text("a\ud800b", 100) == "a?b"
    cut = bounded_text("é" * 1000, 101)
    cut.encode()
    assert cut.startswith("é" * 50)
    assert "cut: " in cut


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_sync_body_longer_than_the_lease_runs_once_while_another_worker_waits(
    tmp_path: Path, workers: WorkerProcesses
) -> None:
    effects = tmp_path / "effects.txt"
    first = workers.spawn("w1", lease_seconds=1)
    second = workers.spawn("w2", lease_seconds=1)
    await first.ready()
    await second.ready()
    client = isolation_app.engine.derive(url=workers.url, workers=0)
    try:
        # the body blocks three leases long; renewals go on beside it
        handle = await client.start("iso.blocking", {"effects": str(effects), "seconds": 3.0})
        assert await handle.result(timeout=60) == "slept"
        events = await client.events(handle.execution_id)
    finally:
        await client.aclose()
    assert len(effects.read_text().splitlines()) == 1, effects.read_text()
    assert len([e for e in events if isinstance(e, ev.StepLeased)]) == 1
    for worker in (first, second):
        assert await worker.terminate() == 0, worker.output()


async def test_the_watchdog_names_the_executions_running_while_the_loop_was_stuck(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = isolation_app.engine.derive(url="memory://", workers=1, lease_seconds=1.0)
    with caplog.at_level(logging.WARNING, logger="stepsource.worker"):
        async with engine:
            handle = await engine.start("iso.stuck", {"seconds": 1.5})
            assert await handle.result(timeout=30) == "done"
    stuck = [r.getMessage() for r in caplog.records if "has made no progress" in r.getMessage()]
    assert stuck, [r.getMessage() for r in caplog.records]
    assert handle.execution_id in stuck[0]
    assert "isolation_app.py" in stuck[0]  # the blocking code is named
