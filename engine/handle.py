"""Client handles: attach to an execution by id, await its result, describe it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from stepsource.aggregates import events as ev
from stepsource.aggregates.values import JSON
from stepsource.errors import (
    ResultTimeout,
    StepCancelledError,
    StepFailedError,
    UnknownExecutionError,
)
from stepsource.projections.models import StepRecord

if TYPE_CHECKING:
    from stepsource.engine.engine import Engine

__all__ = ["ExecutionHandle"]

_MAX_POLL = 0.5


class ExecutionHandle:
    """A reference to one execution. Cheap to create; every call reads the log."""

    def __init__(self, engine: Engine, execution_id: str) -> None:
        self._engine = engine
        self.execution_id = execution_id
        self._next_version = 1
        self._step_id: str | None = None
        self._terminal: ev.ExecutionEvent | None = None

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.execution_id!r})"

    async def _poll(self) -> ev.ExecutionEvent | None:
        events = await self._engine._store.events(self.execution_id, self._next_version)
        if not events and self._next_version == 1:
            raise UnknownExecutionError(
                "no such execution in this backend",
                execution_id=self.execution_id,
                hint="Check the id and the backend URL (--url or STEPSOURCE_URL)",
            )
        for event in events:
            if isinstance(event, ev.StepScheduled):
                self._step_id = event.step_id
            if isinstance(event, (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)):
                self._terminal = event
        self._next_version += len(events)
        return self._terminal

    async def result(self, timeout: float | None = None) -> JSON:
        """The recorded output once the execution completes (JSON data).

        Raises StepFailedError if it failed, StepCancelledError if it was cancelled, and
        ResultTimeout if ``timeout`` seconds pass first (the execution goes on).
        """
        terminal = self._terminal
        delay = 0.01
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            while (terminal := await self._poll()) is None:
                await self._engine._changes.wait(delay)
                delay = min(delay * 2, _MAX_POLL)
        if terminal is None:
            raise ResultTimeout(
                f"the execution did not finish within {timeout} seconds",
                execution_id=self.execution_id,
                step_id=self._step_id,
                hint="It goes on running; call result() again or raise the timeout",
            )
        if isinstance(terminal, ev.StepFailed):
            raise StepFailedError(
                f"the step failed: {terminal.reason}",
                execution_id=self.execution_id,
                step_id=self._step_id,
            )
        if isinstance(terminal, ev.StepCancelled):
            raise StepCancelledError(
                f"the execution was cancelled: {terminal.reason}",
                execution_id=self.execution_id,
                step_id=self._step_id,
            )
        assert isinstance(terminal, ev.StepCompleted)
        return terminal.output

    async def describe(self) -> StepRecord:
        """The execution record (seed 001 fields, attempts included)."""
        return await self._engine.describe(self.execution_id)
