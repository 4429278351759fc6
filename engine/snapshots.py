"""Snapshots: an aggregate's state every N events, so loading never replays the whole log.

A snapshot is a derived, rebuildable index beside the log (the backend's snapshot store):
the latest one of each execution, and the one taken as its latest attempt started
(:func:`attempt_key`), from which a worker resuming that attempt replays it.
JSON of the aggregate's attributes, encrypted with the log's cipher when there is one.
Loading (state, checkpoints, the execution record, a resume) reads the newest of these at or
below the wanted version and folds only the events after it; a snapshot that cannot be read
is ignored (the log is the truth), never trusted.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from eventsourcing.persistence import Cipher

from stepsource.adapters.ports import Snapshot
from stepsource.aggregates.execution import StepExecution

__all__ = ["SNAPSHOT_TOPIC", "attempt_key", "decode_snapshot", "encode_snapshot"]

#: v2: the aggregate keeps its unconsumed events; v3: and its attempt log (the execution
#: record's attempts); an older snapshot is ignored (the log is replayed)
SNAPSHOT_TOPIC = "stepsource:StepExecution.snapshot.v3"
_DATETIMES = ("_created_on", "_modified_on", "started_at", "completed_at")
#: the buffer, the limits and what is cached from the id are no part of the state
_SKIPPED = ("_pending_events", "limits", "pending_bytes", "execution_id")


def attempt_key(execution_id: str) -> str:
    """Where the snapshot of an execution as its latest attempt started is kept, beside the
    latest snapshot (which later snapshots replace): what a resume of that attempt starts
    from, however many events the attempts before it made."""
    return f"{execution_id}.attempt"


def encode_snapshot(
    aggregate: StepExecution, cipher: Cipher | None, key: str | None = None
) -> Snapshot:
    """The aggregate's snapshot, kept under ``key`` (default: the execution id)."""
    state: dict[str, Any] = {k: v for k, v in vars(aggregate).items() if k not in _SKIPPED}
    state["_id"] = str(state["_id"])
    for name in _DATETIMES:
        if isinstance(state.get(name), datetime):
            state[name] = state[name].isoformat()
    data = orjson.dumps(state)
    if cipher is not None:
        data = cipher.encrypt(data)
    return Snapshot(key or aggregate.execution_id, aggregate.version, SNAPSHOT_TOPIC, data)


def decode_snapshot(snapshot: Snapshot, cipher: Cipher | None) -> StepExecution | None:
    """The aggregate a snapshot holds, or None if it cannot be read (then replay instead)."""
    if snapshot.topic != SNAPSHOT_TOPIC:
        return None
    try:
        data = cipher.decrypt(snapshot.data) if cipher is not None else snapshot.data
        state: dict[str, Any] = orjson.loads(data)
        state["_id"] = uuid.UUID(state["_id"])
        for name in _DATETIMES:
            if isinstance(state.get(name), str):
                state[name] = datetime.fromisoformat(state[name])
    except (ValueError, KeyError, TypeError):
        return None
    aggregate = StepExecution.__new__(StepExecution)
    aggregate.__dict__.update(state)
    aggregate.__dict__["_pending_events"] = []
    if aggregate.version != snapshot.version:
        return None
    return aggregate
