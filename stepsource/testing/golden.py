"""Golden histories: save an execution's events to a JSON file; replay them against the
current handler code in a test, as Temporal's Replayer does. A change that would break the
replay of executions already in production logs fails the test instead.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import orjson

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Commit, NewEvent
from stepsource.engine.engine import Engine
from stepsource.engine.store import parse_execution_id
from stepsource.testing.crash import ReplayMismatch

__all__ = ["FORMAT", "load_history", "replay_history", "save_history"]

FORMAT = "stepsource-history/1"


async def save_history(engine: Engine, execution_id: str, path: str | Path) -> Path:
    """Write the execution's events (decrypted, as readable JSON) to ``path``."""
    execution_id = parse_execution_id(execution_id)
    store = engine.store
    records = await store.backend.read_stream(execution_id)
    events = []
    for record in records:
        data, _ = store.codec.plaintext(record)  # decrypted, its checksum checked and removed
        events.append(
            {"version": record.version, "topic": record.topic, "data": orjson.loads(data)}
        )
    step_id = str(events[0]["data"].get("step_id", "")) if events else ""
    document = {
        "format": FORMAT,
        "execution_id": execution_id,
        "step_id": step_id,
        "events": events,
    }
    target = Path(path)
    await anyio.Path(target).write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    return target


async def load_history(path: str | Path) -> tuple[str, MemoryBackend]:
    """An in-memory log holding the saved events, and the execution's id."""
    document = orjson.loads(await anyio.Path(path).read_bytes())
    if document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stepsource history ({FORMAT})")
    execution_id = str(uuid.UUID(document["execution_id"]))
    backend = MemoryBackend()
    events = [
        NewEvent(execution_id, int(e["version"]), str(e["topic"]), orjson.dumps(e["data"]))
        for e in document["events"]
    ]
    await backend.append(Commit(execution_id, 0, events))
    return execution_id, backend


async def replay_history(engine: Engine, path: str | Path) -> str:
    """Replay a saved history against the steps registered on ``engine``.

    Raises :class:`ReplayMismatch` naming the first divergence (the operation recorded and
    the one the current code attempted); returns the execution id when the code replays the
    history exactly.
    """
    execution_id, backend = await load_history(path)
    view = engine.derive(backend=backend, workers=0)
    divergence = await view.verify(execution_id)
    if divergence is not None:
        raise ReplayMismatch(f"{Path(path).name}: {divergence.message}")
    return execution_id
