"""Which recording scope a task is in: the enclosing ctx.do name, a message handler's scope,
or "" for the handler body."""

from __future__ import annotations

from contextvars import ContextVar

from stepsource.errors import (
    BackendUnavailableError,
    NonDeterminismError,
    StepFailedError,
    VersionConflictError,
)

__all__ = ["CONTROL_FLOW", "SCOPE"]

SCOPE: ContextVar[str] = ContextVar("stepsource_scope", default="")

#: failures that are not a sub-step's or an update's own: they unwind unrecorded (an outage
#: of the backend is the worker's problem, never the handler's failure)
CONTROL_FLOW = (StepFailedError, NonDeterminismError, VersionConflictError, BackendUnavailableError)
