"""The command line on a Redis URL: ``export`` from SQLite to Redis and from Redis back to
SQLite gives the same projections, and ``ls``, ``show``, ``events`` and ``verify`` read a
Redis log like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.testing.redis_server import RedisServer

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import cli_app_v1  # noqa: E402

pytestmark = pytest.mark.timeout(180)
DEADLINE = 30.0
STEPSOURCE = str(Path(sys.executable).parent / "stepsource")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("cli")) as server:
        yield server


def stepsource(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
    env["PYTHONPATH"] = str(TESTS_DIR)
    return subprocess.run(
        [STEPSOURCE, "--url", url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def populate(url: str) -> list[str]:
    engine = cli_app_v1.engine.derive(url=url, workers=4)
    async with engine:
        handles = [await engine.start("cli.order", {"items": [n, 2 * n]}) for n in range(3)]
        handles.append(await engine.start("cli.flaky", {"n": 3}))
        handles.append(await engine.start("cli.waiter", {"name": "go"}))
        for handle in handles[:-1]:
            await handle.result(timeout=DEADLINE)
        with anyio.fail_after(DEADLINE):
            while not await engine.executions(status="waiting"):
                await anyio.sleep(0.02)
        await handles[-1].signal("nudge", "in the inbox")
    await engine.aclose()
    return [h.execution_id for h in handles]


async def projections(url: str, ids: list[str]) -> dict[str, Any]:
    engine = ss.Engine(url, workers=0)
    seen: dict[str, Any] = {}
    for eid in ids:
        events = await engine.events(eid)
        seen[eid] = {
            "state": await engine.state_of(eid),
            "history": await engine.history_of(eid),
            "record": await engine.describe(eid),
            "events": [(type(e).__name__, e.originator_version, e.timestamp) for e in events],
        }
    summaries = await engine.executions(limit=1000)
    seen["index"] = sorted((s.execution_id, s.status, s.version) for s in summaries)
    await engine.aclose()
    return seen


def test_export_to_redis_and_back_and_commands_on_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    on_redis = f"{redis_server.url}?prefix=EXPORT{uuid.uuid4().hex[:8]}"
    back = f"sqlite:///{tmp_path / 'back.db'}"
    ids = anyio.run(populate, source)
    for origin, target in ((source, on_redis), (on_redis, back)):
        done = stepsource(origin, "export", "--to", target)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verified: event counts, every stream's last version and the global state" in (
            done.stdout
        )
    expected = anyio.run(projections, source, ids)
    assert anyio.run(projections, on_redis, ids) == expected
    assert anyio.run(projections, back, ids) == expected

    listed = stepsource(on_redis, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(row["execution_id"] for row in json.loads(listed.stdout)) == sorted(ids)
    shown = stepsource(on_redis, "show", ids[0])
    assert shown.returncode == 0, shown.stderr
    assert ids[0] in shown.stdout
    events = stepsource(on_redis, "events", ids[0], "--json")
    assert events.returncode == 0, events.stderr
    assert json.loads(events.stdout)[0]["type"] == "StepScheduled"
    verified = stepsource(on_redis, "verify", "--app", "cli_app_v1:engine")
    assert verified.returncode == 0, verified.stdout + verified.stderr
