"""(d3) A worker resuming an open attempt, with and without a long history of earlier attempts.

The log is built through the public API by a builder process (``python -m
bench.workloads.resume build ...``): one execution of a step whose handler writes ``per``
states per attempt (``set_state``, made durable by ``ctx.flush()``) and fails the attempt
``earlier`` times (``max_retries`` with no delay between attempts); in the attempt after
them it writes the same ``per`` states, flushes, tells the parent and waits forever. The
parent SIGKILLs it there, so the log ends with an open attempt of about ``per`` events
after about ``earlier * per`` events of failed attempts, and waits until the dead worker's
lease has lapsed. Both processes use ``snapshot_every=100``.

Each run copies those files and times a fresh worker (``workers=1``) from the moment its
backend hands it the lease (``lease`` returning the execution) to ``result()`` of the
resumed attempt: it loads the execution, re-runs the handler over the open attempt's
recorded operations and completes it. The same is measured on a log built with no earlier
attempts (``earlier=0``); the target is the ratio of the two times.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

import stepsource as ss
from bench.common import Recorder, main, profiled, remove_db

SNAPSHOT_EVERY = 100
#: the builder's lease: short, so that the killed worker's lease lapses soon
BUILDER_LEASE_SECONDS = 1.0
#: set in the builder process only: the last attempt waits there to be killed
HOLD_OPEN: dict[str, Path] = {}


def register(engine: ss.Engine, earlier: int) -> None:
    @engine.step(
        "bench.resume",
        max_retries=max(earlier, 1),
        retry=ss.RetryPolicy(initial=0.0, backoff=1.0, maximum=0.0),
    )
    async def handler(ctx: ss.StepContext, per: int, earlier: int) -> int:
        for i in range(per):
            await ctx.set_state(f"k{i % 10}", {"i": i, "attempt": ctx.retry_count})
        if ctx.retry_count < earlier:
            raise RuntimeError("a failed attempt (building the history)")
        await ctx.flush()
        marker = HOLD_OPEN.get("marker")
        if marker is not None:
            marker.write_text(ctx.execution_id)
            await anyio.sleep_forever()
        return per


async def build(path: Path, earlier: int, per: int, marker: Path) -> None:
    """The builder process: run the execution until its last attempt is open and waiting."""
    HOLD_OPEN["marker"] = marker
    engine = ss.Engine(
        f"sqlite:///{path}",
        workers=1,
        snapshot_every=SNAPSHOT_EVERY,
        lease_seconds=BUILDER_LEASE_SECONDS,
        poll_interval=0.01,
    )
    register(engine, earlier)
    async with engine:
        await engine.start("bench.resume", {"per": per, "earlier": earlier})
        await anyio.sleep_forever()


def build_log(path: Path, earlier: int, per: int) -> tuple[str, float]:
    """Run the builder in its own process and SIGKILL it with its last attempt open; the
    execution id and the seconds the build took."""
    remove_db(path)
    marker = path.with_suffix(".ready")
    marker.unlink(missing_ok=True)
    started = time.perf_counter()
    command = [sys.executable, "-m", "bench.workloads.resume", "build", str(path)]
    child = subprocess.Popen([*command, str(earlier), str(per), str(marker)])
    try:
        deadline = time.monotonic() + 1800
        while not marker.exists() or not marker.read_text():
            if child.poll() is not None:
                raise RuntimeError(f"the builder exited with {child.returncode} before the end")
            if time.monotonic() > deadline:
                raise TimeoutError("the builder did not reach the open attempt in 30 minutes")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(BUILDER_LEASE_SECONDS + 0.5)  # the dead worker's lease lapses
    return marker.read_text(), seconds


def copy_log(source: Path, target: Path) -> None:
    remove_db(target)
    for suffix in ("", "-wal", "-shm"):
        for name in ("", ".readmodels"):
            found = Path(f"{source}{name}{suffix}")
            if found.exists():
                shutil.copyfile(found, f"{target}{name}{suffix}")


async def resume(path: Path, execution_id: str, earlier: int) -> tuple[float, int]:
    """Milliseconds from the lease to ``result()`` of a fresh worker resuming the execution,
    and the number of events in its log."""
    engine = ss.Engine(
        f"sqlite:///{path}", workers=1, snapshot_every=SNAPSHOT_EVERY, poll_interval=0.01
    )
    register(engine, earlier)
    backend = engine.store.backend
    lease = backend.lease
    leased_at: list[float] = []

    async def timed_lease(*args: Any, **kwargs: Any) -> Any:
        leases = await lease(*args, **kwargs)
        if leases and not leased_at:
            leased_at.append(time.perf_counter())
        return leases

    backend.lease = timed_lease  # type: ignore[method-assign]
    async with engine:
        await engine.get_handle(execution_id).result()
        ended = time.perf_counter()
        events = int(await backend.max_position())
    return (ended - leased_at[0]) * 1000, events


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, per, earlier = int(params["runs"]), int(params["per"]), int(params["earlier"])
    for metric, attempts in (("ss_resume_fresh", 0), ("ss_resume_after_history", earlier)):
        source = tmp / f"{metric}-source.db"
        execution_id, seconds = await anyio.to_thread.run_sync(build_log, source, attempts, per)
        recorder.notes[f"{metric} build seconds"] = f"{seconds:.1f}"
        path = tmp / f"{metric}.db"
        copy_log(source, path)
        await resume(path, execution_id, attempts)  # uncounted: the process's first-use costs
        for _ in range(runs):
            copy_log(source, path)
            ms, events = await resume(path, execution_id, attempts)
            recorder.add(
                metric,
                ms,
                "ms",
                earlier_attempts=attempts,
                events_per_attempt=per,
                log_events=events,
                snapshot_every=SNAPSHOT_EVERY,
            )
        if metric in profile:
            copy_log(source, path)
            with profiled(recorder, metric):
                await resume(path, execution_id, attempts)
        remove_db(path)
        remove_db(source)


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(job, recorder, params, tmp, profile)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        db, earlier_attempts, per_attempt, ready = sys.argv[2:6]
        anyio.run(build, Path(db), int(earlier_attempts), int(per_attempt), Path(ready))
    else:
        main(measure)
