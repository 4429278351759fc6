"""Typed results: an execution's recorded output validated into a Python type.

The log holds an execution's output as strict JSON. ``handle.result()`` returns that data;
``handle.result(type=Model)`` validates it into ``Model`` (any type pydantic can validate:
a model, a dataclass, ``list[Item]``...), and a handle from ``engine.start(handler, ...)`` (the
decorated function rather than its id) validates into the handler's return annotation, so
``await handle.result()`` is typed as the handler's return type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from stepsource.aggregates.values import JSON
from stepsource.engine.definitions import StepDefinition
from stepsource.errors import OutputValidationError, UnknownStepError

if TYPE_CHECKING:
    import pydantic

    #: how a handle turns recorded output into a value: None keeps the JSON data
    OutputType: TypeAlias = pydantic.TypeAdapter[Any] | None

__all__ = ["resolve_step", "validate_output"]


def resolve_step(
    definitions: Mapping[str, StepDefinition], step: str | Callable[..., Any]
) -> tuple[str, OutputType]:
    """The step id ``step`` names (an id, or a handler registered on this engine) and the
    adapter its handle validates the output with (only for a handler)."""
    if isinstance(step, str):
        return step, None
    for definition in definitions.values():
        if definition.handler is step:
            return definition.step_id, definition.output_adapter
    name = getattr(step, "__qualname__", repr(step))
    raise UnknownStepError(
        f"{name} is not a step handler registered on this engine",
        hint="Pass the function decorated with @engine.step on this engine, or its step id",
    )


def validate_output(
    output: JSON,
    into: type[Any] | pydantic.TypeAdapter[Any],
    *,
    execution_id: str,
    step_id: str | None,
) -> Any:
    """``output`` validated into ``into``; OutputValidationError when it does not fit."""
    import pydantic  # a handle validating into a type needs it; a worker does not

    if isinstance(into, pydantic.TypeAdapter):
        adapter, name = into, "the handler's return annotation"
    else:
        adapter, name = pydantic.TypeAdapter(into), getattr(into, "__name__", repr(into))
    try:
        return adapter.validate_python(output)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'output'}: {err['msg']}"
            for err in exc.errors()
        )
        raise OutputValidationError(
            f"the recorded output does not validate into {name}: {problems}",
            execution_id=execution_id,
            step_id=step_id,
            hint="Ask for the type the handler returns, or read the JSON data with result()",
        ) from None
