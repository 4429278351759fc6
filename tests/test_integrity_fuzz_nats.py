"""Foreign messages published into a NATS log while workers run take no worker down.

The JetStream stream of a log accepts any publisher on its subjects, so the test plays one:
while the engine works, random messages land on the log's subjects: on subjects of new
execution ids, on subjects that name no execution, and on the subjects of running
executions (bytes that are no commit, a commit frame with missing or wrong headers, a
well-formed commit of an unknown topic). Afterwards every execution whose own subject was
left untouched has completed with its normal output, every damaged one is quarantined in the
index with the reason, the whole-log reads (``ls``, a rebuild of the read models) still
work, and the workers went on serving the rest. The SQLite counterpart is
tests/test_integrity_fuzz.py.
"""

from __future__ import annotations

import random
import uuid

import anyio
import nats
import pytest

import stepsource as ss
from stepsource.adapters.nats.wire import FIRST_HEADER, LAST_HEADER, Layout, encode_commit
from stepsource.testing.nats_server import NatsServer

pytestmark = pytest.mark.anyio

EXECUTIONS = 16


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


@pytest.fixture
def stream() -> str:
    return f"F{uuid.uuid4().hex[:12]}"


def _garbage(rng: random.Random, version: int) -> tuple[bytes, dict[str, str] | None]:
    """A payload and headers no release of stepsource published."""
    headers = {FIRST_HEADER: str(version), LAST_HEADER: str(version)}
    choice = rng.randrange(5)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), headers
    if choice == 1:
        return encode_commit([("stepsource:StateSet", b"{}")]), None  # headers missing
    if choice == 2:
        return encode_commit([("stepsource:FromTheFuture", b"{}")]), headers
    if choice == 3:
        wrong = {FIRST_HEADER: str(version), LAST_HEADER: "not a number"}
        return encode_commit([("stepsource:StateSet", b"{}")]), wrong
    return b'{"hello": "from another program"}', headers


@pytest.mark.parametrize("seed", [1, 2])
async def test_foreign_messages_while_workers_run_quarantine_only_what_they_touch(
    nats_server: NatsServer, stream: str, seed: int
) -> None:
    rng = random.Random(seed)
    url = f"{nats_server.url}?stream={stream}"
    layout = Layout(stream)
    engine = ss.Engine(url, poll_interval=0.02, lease_seconds=1.0, workers=8)

    @engine.step("fuzz.double")
    async def handler(ctx: ss.StepContext, n: int) -> int:
        for i in range(4):
            await ctx.set_state("i", i)
            await ctx.sleep(0.15)
        return n * 2

    damaged: set[str] = set()
    foreign: set[str] = set()
    connection = await nats.connect(nats_server.url)
    js = connection.jetstream()
    try:
        async with engine:
            handles = [await engine.start("fuzz.double", {"n": n}) for n in range(EXECUTIONS)]
            ids = [h.execution_id for h in handles]
            for _ in range(24):
                await anyio.sleep(rng.uniform(0.0, 0.06))
                kind = rng.randrange(4)
                if kind == 0:  # a new execution id of its own: listed as quarantined
                    victim = str(uuid.uuid4())
                    foreign.add(victim)
                    subject = layout.event_subject(victim)
                elif kind == 1:  # a subject that names no execution
                    subject = f"{stream}.ev.garbage.{rng.randrange(10**6)}"
                    victim = ""
                else:  # among the commits of a running execution
                    victim = rng.choice(ids)
                    damaged.add(victim)
                    subject = layout.event_subject(victim)
                version = 1 if kind == 0 else rng.randrange(1, 30)
                payload, headers = _garbage(rng, version)
                await js.publish(subject, payload, stream=stream, headers=headers)
            untouched = [h for h in handles if h.execution_id not in damaged]
            assert damaged
            assert untouched
            with anyio.fail_after(60):
                for n, handle in enumerate(handles):
                    if handle in untouched:
                        assert await handle.result() == n * 2
            rows: list[ss.ExecutionSummary] = []
            with anyio.move_on_after(30):
                while {row.execution_id for row in rows} < damaged | foreign:
                    await anyio.sleep(0.1)
                    rows = await engine.executions(status="quarantined", limit=1000)
            listed = {row.execution_id: row for row in await engine.executions(limit=1000)}
            missing = (damaged | foreign) - {row.execution_id for row in rows}
            assert not missing, [listed.get(eid) for eid in missing]
            for row in rows:
                assert row.execution_id in damaged | foreign
                assert row.last_error is not None
                assert row.last_error["message"]
            # untouched executions are listed as completed, the whole log still reads
            for handle in untouched:
                assert listed[handle.execution_id].status == "completed"
            # the engine is still serving: a new execution runs to its end
            later = await engine.start("fuzz.double", {"n": 100})
            with anyio.fail_after(20):
                assert await later.result() == 200
        await engine.aclose()
        # a rebuild of the read models from the whole log gives the same quarantine
        client = ss.Engine(url, workers=0)
        async with client:
            await client.rebuild_projections()
            again = await client.executions(status="quarantined", limit=1000)
            assert {row.execution_id for row in again} == {row.execution_id for row in rows}
        await client.aclose()
    finally:
        await connection.close()
