"""(u) The web UI on big logs, timed server-side: each request goes through the ASGI app
(``engine.ui_app()``) in this process with httpx's ASGI transport, so a time is what the
server spends on a page (routing, the engine's queries, rendering), without a browser or
a network.

The log is one SQLite file (WAL, ``synchronous=FULL``) holding ``executions`` executions and
one execution of about ``events`` events:

- The executions are written in bulk through the engine's execution store: each is a
  ``StepExecution`` aggregate driven through its lifecycle in memory (scheduled, leased,
  started, then completed, failed, left running or only scheduled) and appended as one
  commit (``engine.store.commit``), ``concurrency`` at a time so that the SQLite writer's
  group commit packs them into few transactions. Nothing runs a handler: the events are
  the ones a worker would have written, without the cost of running 100,000 executions.
- The long execution is run by a worker (``snapshot_every=100``): a handler making commits
  of 10 events (a ``set_state`` and nine history entries), as the replay workload does.

Then a fresh engine (``workers=0``, ``snapshot_every=100``) serves the app; one untimed
request catches its executions index up to the log (reported as a note), and each metric
is the median of ``runs`` requests:

- ``ui_list_first_page``: ``GET /``, the first page of the list with its counts and chart;
- ``ui_list_filtered``: ``GET /?status=failed``;
- ``ui_execution_page``: ``GET /e/ID?page=P`` for a random page P of the long execution
  (200 events a page);
- ``ui_scrub_move``: ``GET /e/ID/versions?v=V&fragment=1`` for a random version V, what
  the page fetches when the scrubber moves.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

import stepsource as ss
from bench.common import Recorder, Timer, main, profiled, remove_db
from bench.workloads.stepsource_sqlite import build_execution
from stepsource.aggregates.execution import StepExecution

SNAPSHOT_EVERY = 100
STEPS = ("bench.ui.import", "bench.ui.charge", "bench.ui.notify")


def lifecycle(n: int, start: datetime) -> StepExecution:
    """Execution ``n``'s aggregate: 1 in 20 failed, 1 in 20 scheduled only, 1 in 20 still
    running, the rest completed; each started ``start`` plus its share of a day."""
    rng = random.Random(n)
    at = start + timedelta(seconds=n * 86_400 / 100_000)
    aggregate = StepExecution.schedule(
        execution_id=uuid.UUID(int=rng.getrandbits(128)),
        timestamp=at,
        step_id=STEPS[n % len(STEPS)],
        step_version="1",
        definition={},
        input={"n": n, "customer": f"c{n % 977}"},
        config={},
        correlation_id=f"batch-{n // 1000}",
        priority=0,
    )
    kind = n % 20
    if kind == 1:
        return aggregate
    at += timedelta(milliseconds=5)
    aggregate.lease(timestamp=at, worker_id="w1", executor="async", lease_expires_ms=0)
    aggregate.start_attempt(timestamp=at, worker_id="w1", step_version="1")
    if kind == 2:
        return aggregate
    at += timedelta(milliseconds=20 + rng.randrange(500))
    op = (1, "", 0, "1")
    if kind == 0:
        aggregate.fail("card declined", None, error_type="fail", timestamp=at, op=op)
    else:
        aggregate.complete({"ok": True, "n": n}, timestamp=at, op=op)
    return aggregate


async def populate(path: Path, count: int, concurrency: int = 256) -> None:
    """``count`` executions appended in bulk through the execution store."""
    engine = ss.Engine(f"sqlite:///{path}", workers=0)
    start = datetime.now(UTC) - timedelta(days=1)
    todo = iter(range(count))

    async def writer() -> None:
        for n in todo:
            await engine.store.commit(lifecycle(n, start))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(writer)
    finally:
        await engine.aclose()


async def timed(http: httpx.AsyncClient, url: str) -> float:
    """Milliseconds of one request (which must succeed)."""
    started = time.perf_counter()
    response = await http.get(url)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    return seconds * 1000


async def serve(recorder: Recorder, path: Path, long_id: str, runs: int, profile: set[str]) -> None:
    engine = ss.Engine(f"sqlite:///{path}", workers=0, snapshot_every=SNAPSHOT_EVERY)
    rng = random.Random(7)
    transport = httpx.ASGITransport(app=engine.ui_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://ui") as http:
        with Timer() as catch_up:
            await timed(http, "/")  # the index folds the log once: a running UI follows it
        recorder.notes["ui_index_catch_up_seconds"] = f"{catch_up.seconds:.1f}"
        total = int((await engine.describe(long_id)).version)
        pages = -(-total // 200)
        urls = {
            "ui_list_first_page": lambda: "/",
            "ui_list_filtered": lambda: "/?status=failed",
            "ui_execution_page": lambda: f"/e/{long_id}?page={rng.randint(1, pages)}",
            "ui_scrub_move": lambda: f"/e/{long_id}/versions?v={rng.randint(1, total)}&fragment=1",
        }
        executions = len(await engine.executions(limit=10**9))
        sizes = {"executions": executions, "events": total}
        for metric, url in urls.items():
            await timed(http, url())  # warm: templates compiled, connections open
            for _ in range(runs):
                recorder.add(metric, await timed(http, url()), "ms", **sizes)
            if metric in profile:
                with profiled(recorder, metric):
                    for _ in range(5):
                        await timed(http, url())
    await engine.aclose()


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    count, events, runs = int(params["executions"]), int(params["events"]), int(params["runs"])
    path = tmp / "ui.db"
    remove_db(path)
    with Timer() as filling:
        anyio.run(populate, path, count)
    recorder.notes["ui_populate_executions_seconds"] = f"{filling.seconds:.1f}"
    with Timer() as building:
        long_id = anyio.run(build_execution, path, events, SNAPSHOT_EVERY)
    recorder.notes["ui_build_long_execution_seconds"] = f"{building.seconds:.1f}"
    anyio.run(serve, recorder, path, long_id, runs, profile)
    remove_db(path)


if __name__ == "__main__":
    main(measure)
