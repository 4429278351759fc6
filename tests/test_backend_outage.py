"""A worker survives its backend going away: it backs off, keeps its in-memory nothing, and
once the server is back the executions finish — nothing acknowledged lost, nothing twice."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.testing.nats_server import NatsServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


async def _read_through_the_outage(engine: ss.Engine, execution_id: str) -> None:
    with contextlib.suppress(ss.BackendUnavailableError):  # it may give up before the restart
        await engine.events(execution_id)


@pytest.mark.slow
async def test_workers_ride_out_a_nats_server_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stepsource")
    with NatsServer(tmp_path / "nats", sync_interval="always") as server:
        url = f"{server.url}?stream=OUTAGE"
        engine = ss.Engine(url, poll_interval=0.05, lease_seconds=1, workers=4)
        bodies: list[str] = []

        @engine.step("outage.step")
        async def step(ctx: ss.StepContext, n: int) -> int:
            await ctx.do("before", lambda: bodies.append(f"before-{n}"))
            await ctx.sleep(1.0)  # the outage happens while these wait
            await ctx.do("after", lambda: bodies.append(f"after-{n}"))
            return n

        async with engine:
            handles = [await engine.start("outage.step", {"n": n}) for n in range(6)]
            with anyio.fail_after(20):
                while len([b for b in bodies if b.startswith("before")]) < 6:
                    await anyio.sleep(0.05)
            server.kill()  # SIGKILL: no goodbye to the clients
            async with anyio.create_task_group() as tg:
                # a read sent at once: down longer than its 2 s request timeout, so it fails
                # at least once whatever the load (a request may otherwise wait in nats-py's
                # reconnect buffer and succeed, and nothing is said)
                tg.start_soon(_read_through_the_outage, engine, handles[0].execution_id)
                await anyio.sleep(2.5)  # the timers fall due while the server is down
                server.start()
            results = [await h.result(timeout=60) for h in handles]
        assert results == list(range(6))
        for n in range(6):  # each recorded body ran once
            assert bodies.count(f"before-{n}") == 1
            assert bodies.count(f"after-{n}") == 1
        for handle in handles:
            types = [type(e).__name__ for e in await engine.events(handle.execution_id)]
            assert types.count("StepCompleted") == 1
            assert types.count("SubStepCompleted") == 2
        await engine.aclose()
    # the worker said so when the backend went away and when it came back
    warnings = [r.getMessage() for r in caplog.records if r.name == "stepsource.nats"]
    assert any("the NATS server does not answer" in w for w in warnings), warnings
    assert any("the NATS server answers again" in w for w in warnings), warnings


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_result_waits_through_unreadable_looks_and_names_an_outage_at_its_timeout(
    tmp_path: Path,
) -> None:
    """Looks at the log that the backend refuses (a server restarting) do not end
    ``result()``; one still refused when the timeout comes raises why, not ResultTimeout."""
    engine = ss.Engine(f"sqlite:///{tmp_path / 'steps.db'}", poll_interval=0.01)

    @engine.step("outage.nap")
    async def nap(ctx: ss.StepContext) -> str:
        await ctx.sleep(0.3)
        return "done"

    client = engine.derive(workers=0)  # a client that reads the log to learn the end
    backend = client.store.backend
    real = backend.stream_version
    refused = {"left": 5}

    async def restarting(stream_id: str) -> int:
        if refused["left"] > 0:
            refused["left"] -= 1
            raise ss.BackendUnavailableError("the server is restarting")
        return await real(stream_id)

    async with engine:
        handle = await client.start("outage.nap")
        backend.stream_version = restarting  # type: ignore[method-assign]
        assert await handle.result(timeout=30) == "done"
        assert refused["left"] == 0
        refused["left"] = 10**9  # now down for good
        later = await client.start("outage.nap")
        with pytest.raises(ss.BackendUnavailableError, match="the server is restarting"):
            await later.result(timeout=0.5)
    await client.aclose()
