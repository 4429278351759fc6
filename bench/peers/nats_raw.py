"""Raw nats-py JetStream publishes against a nats-server started here (the peer of (g)).

Same server settings as stepsource's NATS runs (``sync_interval: always``, file storage, one
replica) and the same stream options as stepsource's event stream (direct get, deny delete
and purge, a 2-minute duplicate window). Every publish carries ``Nats-Msg-Id`` and
``Nats-Expected-Last-Subject-Sequence`` (per-subject optimistic concurrency), as a commit of
stepsource does, with a payload of the size of a stored stepsource event.

- sync: one subject, each publish awaited before the next.
- pipelined: 200 subjects at once on one connection, each publishing its next message when
  its previous one is acknowledged (per-subject OCC allows no more in flight per subject).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig

from bench.common import ROW_BYTES, Recorder, main
from stepsource.testing.nats_server import NatsServer

PAYLOAD = b"x" * ROW_BYTES


async def publisher(js: Any, subject: str, count: int) -> None:
    last = 0
    for _ in range(count):
        ack = await js.publish(
            subject,
            PAYLOAD,
            headers={
                "Nats-Msg-Id": uuid.uuid4().hex,
                "Nats-Expected-Last-Subject-Sequence": str(last),
            },
        )
        last = ack.seq


async def job(recorder: Recorder, params: dict[str, Any], tmp: Path) -> None:
    runs, n = int(params["runs"]), int(params["seq_n"])
    subjects, per = int(params["executions"]), int(params["per"])
    with NatsServer(tmp / "nats") as server:
        recorder.durability["raw nats-py"] = {
            "jetstream": "sync_interval: always (every write fsynced before the ack)",
            "storage": "file, 1 replica",
        }
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            for run in range(2 * runs):
                name = f"RAW{run}"
                await js.add_stream(
                    StreamConfig(
                        name=name,
                        subjects=[f"{name}.>"],
                        storage=StorageType.FILE,
                        num_replicas=1,
                        allow_direct=True,
                        deny_delete=True,
                        deny_purge=True,
                        duplicate_window=120.0,
                    )
                )
                if run < runs:
                    started = time.perf_counter()
                    await publisher(js, f"{name}.one", n)
                    rate = n / (time.perf_counter() - started)
                    recorder.add("nats_raw_sync", rate, "msgs/s", n=n)
                else:
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(publisher(js, f"{name}.s{i}", per) for i in range(subjects))
                    )
                    rate = subjects * per / (time.perf_counter() - started)
                    recorder.add(
                        "nats_raw_pipelined", rate, "msgs/s", subjects=subjects, per_subject=per
                    )
        finally:
            await nc.close()


def measure(recorder: Recorder, params: dict[str, Any], tmp: Path, profile: set[str]) -> None:
    asyncio.run(job(recorder, params, tmp))


if __name__ == "__main__":
    main(measure)
