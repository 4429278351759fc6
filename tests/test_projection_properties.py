"""Property: what the log says equals what a plain-dict model of the same operations says.

For random programs of context operations run by a real handler on a real SQLite file, a
fresh Engine over the same file projects state, history and checkpoints equal to an
independent model (dicts and lists, no stepsource code); the state at every version equals
the model's state after the same number of operations (so every restore is exact); and the
memory backend projects exactly what SQLite does.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings

import stepsource as ss
from stepsource.testing.programs import register_program_step
from stepsource.testing.strategies import operation_programs

STEP = "test.program"
FIRST_OP_VERSION = 4  # 1 StepScheduled, 2 StepLeased, 3 StepStarted


def register_interpreter(engine: ss.Engine) -> None:
    register_program_step(engine, STEP)


class Model:
    """The meaning of each operation, written out with plain dicts and lists."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.checkpoints: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (metadata, state)
        self.history: list[tuple[str, Any]] = []
        self.states: list[dict[str, Any]] = []  # state after each recorded operation

    def run(self, program: list[list[Any]]) -> None:
        for name, *args in program:
            if name == "set":
                self.state[args[0]] = copy.deepcopy(args[1])
                self.history.append(("state-set", {"key": args[0], "value": args[1]}))
            elif name == "update":
                self.state.update(copy.deepcopy(args[0]))
                self.history.append(("state-set", {"values": args[0]}))
            elif name == "delete":
                self.state.pop(args[0], None)
                self.history.append(("state-deleted", {"key": args[0]}))
            elif name == "checkpoint":
                self.checkpoints.append((args[0], copy.deepcopy(self.state)))
                self.history.append(("checkpoint", args[0]))
            elif name == "restore":
                if not self.checkpoints:
                    continue
                self.state = copy.deepcopy(self.checkpoints[args[0] % len(self.checkpoints)][1])
                self.history.append(("restored", None))
            elif name == "history":
                self.history.append((args[0], args[1]))
            self.states.append(copy.deepcopy(self.state))


async def run_program(url: str, program: list[list[Any]]) -> str:
    engine = ss.Engine(url, poll_interval=0.01, workers=1)
    register_interpreter(engine)
    async with engine:
        handle = await engine.start(STEP, {"program": program})
        await handle.result(timeout=30)
    return handle.execution_id


async def projections(engine: ss.Engine, eid: str) -> dict[str, Any]:
    history = await engine.history_of(eid)
    comparable = []
    for entry in history[1:-1]:  # between "started" and "completed"
        if entry.type == "checkpoint":
            comparable.append(("checkpoint", entry.details["metadata"]))
        elif entry.type == "restored":
            comparable.append(("restored", None))
        else:
            comparable.append((entry.type, entry.details))
    checkpoints = await engine.checkpoints_of(eid)
    events = await engine.events(eid)
    return {
        "state": await engine.state_of(eid),
        "history_ends": (history[0].type, history[-1].type),
        "history": comparable,
        "checkpoints": [(cp.metadata, cp.state) for cp in checkpoints],
        "event_types": [type(e).__name__ for e in events],
        "states": [
            await engine.state_of(eid, at_version=v)
            for v in range(FIRST_OP_VERSION, len(events))  # the last event is StepCompleted
        ],
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=operation_programs())
def test_replayed_projections_equal_a_plain_model_on_both_backends(
    program: list[list[Any]],
) -> None:
    model = Model()
    model.run(program)

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'steps.db'}"
            eid = await run_program(url, program)
            fresh = ss.Engine(url, workers=0)  # a new process's view of the same file
            on_sqlite = await projections(fresh, eid)
            await fresh.aclose()
        memory = ss.Engine("memory://", poll_interval=0.01, workers=1)
        register_interpreter(memory)
        async with memory:
            handle = await memory.start(STEP, {"program": program})
            await handle.result(timeout=30)
        on_memory = await projections(memory, handle.execution_id)
        return on_sqlite, on_memory

    on_sqlite, on_memory = anyio.run(main)
    assert on_sqlite["state"] == model.state
    assert on_sqlite["history_ends"] == ("started", "completed")
    assert on_sqlite["history"] == model.history
    assert on_sqlite["checkpoints"] == model.checkpoints
    assert on_sqlite["states"] == model.states  # every version, every restore exact
    assert on_memory == on_sqlite
