"""Sagas: compensations recorded as a flow progresses, run in reverse when it fails.

```python
async with ctx.saga("order") as saga:
    reservation = await saga.step("reserve", reserve, compensate=release)
    payment = await saga.step("charge", charge, compensate=refund)
    await saga.step("ship", ship)
```

Each action and each compensation is a ``ctx.do`` sub-step (``<saga>:<name>`` and
``<saga>:undo:<name>``), so everything is durable: a crash during the actions or during the
compensation resumes where it stopped, completed actions and compensations are not run again,
and a replay re-registers the compensations from the recorded results. A compensation
receives the result of its action. The exception that triggered the compensation is raised
again once every compensation ran.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from stepsource.engine.scope import CONTROL_FLOW

__all__ = ["Saga", "SubSteps"]


class SubSteps(Protocol):
    """What a saga needs of the context: durable sub-steps and history entries."""

    async def do(self, name: str, fn: Callable[[], Any]) -> Any: ...

    def add_history_entry(self, type: str, details: Mapping[str, Any] | None = None) -> None: ...


class Saga:
    def __init__(self, ctx: SubSteps, name: str) -> None:
        self._ctx = ctx
        self.name = name
        self._compensations: list[tuple[str, Callable[[Any], Any], Any]] = []
        self.compensated: list[str] = []

    async def step(
        self,
        name: str,
        action: Callable[[], Any],
        *,
        compensate: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run ``action`` as a durable sub-step; remember ``compensate(result)`` for a failure."""
        result = await self._ctx.do(f"{self.name}:{name}", action)
        if compensate is not None:
            self._compensations.append((name, compensate, result))
        return result

    async def compensate(self) -> None:
        """Run the recorded compensations, newest first, each as a durable sub-step."""
        self._ctx.add_history_entry(
            "saga-compensating",
            {"saga": self.name, "steps": [name for name, _, _ in reversed(self._compensations)]},
        )
        while self._compensations:
            name, undo, result = self._compensations.pop()
            await self._ctx.do(f"{self.name}:undo:{name}", functools.partial(undo, result))
            self.compensated.append(name)

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, CONTROL_FLOW):
            return  # success, a suspension/cancellation unwinding, or the engine's own flow
        await self.compensate()
