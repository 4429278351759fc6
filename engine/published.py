"""Step definitions published by workers, for clients that do not have the step registered.

A worker publishes what it runs (id, version, input JSON Schema, definition snapshot) when it
starts. ``engine.start`` of a step registered only elsewhere validates the input against the
published schema and records the published snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from stepsource.adapters.ports import Backend
from stepsource.aggregates.values import JSONObject
from stepsource.engine.definitions import StepDefinition
from stepsource.errors import InputValidationError, UnknownStepError

__all__ = ["PublishedStep", "fetch_published", "publish"]


@dataclass(frozen=True)
class PublishedStep:
    step_id: str
    version: str
    input_schema: JSONObject
    snapshot: JSONObject

    def validate_input(self, data: JSONObject, *, execution_id: str | None) -> None:
        import jsonschema  # only a client starting a step registered elsewhere needs it

        validator = jsonschema.Draft202012Validator(self.input_schema)
        problems = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
        if problems:
            text = "; ".join(
                f"{'.'.join(str(p) for p in e.path) or 'input'}: {e.message}" for e in problems
            )
            raise InputValidationError(
                f"input does not match the published schema of version {self.version}: {text}",
                execution_id=execution_id,
                step_id=self.step_id,
                hint="The step is registered by a worker, not here; fix the input",
            )


async def publish(backend: Backend, definition: StepDefinition) -> None:
    data = {
        "version": definition.version,
        "input_schema": definition.input_schema(),
        "snapshot": definition.snapshot(),
        "code_hash": definition.code_hash,
    }
    await backend.publish_definition(definition.step_id, definition.version, orjson.dumps(data))


#: the engine's own steps (the schedules' ``stepsource.schedule``): not named to users
_ENGINES_OWN = "stepsource."


async def fetch_published(backend: Backend, step_id: str, known: list[str]) -> PublishedStep:
    found = await backend.published_definition(step_id)
    if found is None:
        users = [k for k in known if not k.startswith(_ENGINES_OWN)]
        raise UnknownStepError(
            f"no step {step_id!r} is registered here (registered: {', '.join(users) or 'none'}) "
            "nor published by any worker of this backend",
            step_id=step_id,
            hint="Import the module that defines the step, or start a worker that runs it",
        )
    version, raw = found
    data: dict[str, Any] = orjson.loads(raw)
    return PublishedStep(step_id, version, data["input_schema"], data["snapshot"])
