"""Raw redis-py script calls against a redis-server started here (the peer of (h)).

Same server settings as stepsource's Redis runs (``appendonly yes``, ``appendfsync always``).
Each call is one ``EVALSHA`` of a small Lua script doing the least a commit must: compare a
list's length with the expected version, then append one row of the size of a stored
stepsource event (and fail if the version is stale) — optimistic concurrency, one round trip.

- sync: one key, each call awaited before the next.
- pipelined: 200 keys; each round sends one call per key in one pipeline (one round trip,
  one fsync) and awaits the answers: the best case of many writers at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio

from bench.common import ROW_BYTES, Recorder, main
from stepsource.testing.redis_server import RedisServer

PAYLOAD = b"x" * ROW_BYTES
APPEND = """
if redis.call('LLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return -1 end
return redis.call('RPUSH', KEYS[1], ARGV[2])
"""


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path) -> None:
    runs, n = int(params["runs"]), int(params["seq_n"])
    keys, per = int(params["executions"]), int(params["per"])
    with RedisServer(tmp / "redis") as server:
        recorder.durability["raw redis-py"] = {
            "redis-server": "appendonly yes, appendfsync always (fsync before every answer)",
        }
        client = redis.asyncio.Redis(host="127.0.0.1", port=server.port)
        try:
            sha = await client.script_load(APPEND)
            for run in range(runs):
                started = time.perf_counter()
                for version in range(n):
                    assert await client.evalsha(sha, 1, f"sync{run}", version, PAYLOAD) > 0
                recorder.add("redis_raw_sync", n / (time.perf_counter() - started), "calls/s", n=n)
            for run in range(runs):
                started = time.perf_counter()
                for version in range(per):
                    pipe = client.pipeline(transaction=False)
                    for key in range(keys):
                        pipe.evalsha(sha, 1, f"pipe{run}:{key}", version, PAYLOAD)
                    assert all(answer > 0 for answer in await pipe.execute())
                rate = keys * per / (time.perf_counter() - started)
                recorder.add("redis_raw_pipelined", rate, "calls/s", keys=keys, per_key=per)
        finally:
            await client.aclose()


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    anyio.run(job, recorder, params, tmp, backend="asyncio")


if __name__ == "__main__":
    main(measure)
