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
receives the result of its action.

Every compensation runs, newest first, even when one before it fails. Then the exception that
triggered them is raised again, or, when a compensation failed, a CompensationError naming
the failures (the triggering exception is its ``__cause__``).

An action whose compensation completed in an earlier attempt of the step is undone: when the
step is retried, that action runs again (as ``<saga>#2:<name>``, then ``#3``...) instead of
returning the result its compensation took back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from stepsource.aggregates.values import with_article
from stepsource.engine.scope import CONTROL_FLOW
from stepsource.errors import CompensationError, StepsourceError, UsageError

__all__ = ["Saga", "SubSteps", "check_saga_name"]


class SubSteps(Protocol):
    """What a saga needs of the context: durable sub-steps and history entries."""

    async def do(self, name: str, fn: Callable[[], Any]) -> Any: ...

    def add_history_entry(self, type: str, details: Mapping[str, Any] | None = None) -> None: ...


def check_saga_name(name: object, what: str, where: Mapping[str, str], *, also: str = "") -> str:
    """``name`` as a saga (``also="#"``) or saga step name: a non-empty str without ``:``
    (the separator of the sub-step names a saga records) or the characters in ``also``."""
    forbidden = [c for c in ":" + also if isinstance(name, str) and c in name]
    if isinstance(name, str) and name and not forbidden:
        return name
    problem = (
        f"not {with_article(type(name).__name__)}"
        if not isinstance(name, str)
        else "not an empty one"
        if not name
        else f"{name!r} holds {forbidden[0]!r}"
    )
    raise UsageError(
        f"{what} must be a non-empty str without {' or '.join(repr(c) for c in ':' + also)}, "
        f"{problem}",
        hint="Name it after what it does, e.g. 'order' or 'reserve'",
        **where,
    )


class Saga:
    """A saga of one execution (``async with ctx.saga("order") as saga``): actions run as
    ``ctx.do`` sub-steps, each with the compensation that takes it back; on an exception in
    the block the recorded compensations run newest first, every one even after one fails,
    and the exception is raised again (a :class:`~stepsource.CompensationError` when a
    compensation failed). ``compensated`` lists what was undone. See flows.md, "Sagas"."""

    def __init__(
        self,
        ctx: SubSteps,
        name: str,
        *,
        done_earlier: Callable[[str], bool],
        where: Mapping[str, str],
    ) -> None:
        """``done_earlier(substep)``: whether that ``ctx.do`` completed in an earlier attempt
        of the step (an action undone then runs again); ``where``: the execution and step, for
        the errors."""
        self._ctx = ctx
        self.name = name
        self._done_earlier = done_earlier
        self._where = dict(where)
        self._steps: set[str] = set()
        #: (step name, sub-step prefix, compensation, the action's result), oldest first
        self._compensations: list[tuple[str, str, Callable[[Any], Any], Any]] = []
        #: the steps compensated, in the order their compensations completed
        self.compensated: list[str] = []
        #: the steps whose compensation failed, with the failure (after compensate() ran)
        self.failed: dict[str, str] = {}

    def _prefix(self, step: str) -> str:
        """The prefix of ``step``'s sub-steps: the saga's name, then ``<name>#2``... for each
        earlier attempt that completed its compensation."""
        prefix, run = self.name, 1
        while self._done_earlier(f"{prefix}:undo:{step}"):
            run += 1
            prefix = f"{self.name}#{run}"
        return prefix

    async def step(
        self,
        name: str,
        action: Callable[[], Any],
        *,
        compensate: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run ``action`` as a durable sub-step; remember ``compensate(result)`` for a failure."""
        what = f"saga {self.name!r}: the step name"
        name = check_saga_name(name, what, self._where)
        if name in self._steps:
            raise UsageError(
                f"saga {self.name!r} already ran a step named {name!r}",
                hint="Step names are unique in a saga; add a loop index or an item id",
                **self._where,
            )
        for role, fn in (("the action", action), ("compensate=", compensate)):
            if (fn is not None or role == "the action") and not callable(fn):
                raise UsageError(
                    f"saga {self.name!r}, step {name!r}: {role} must be a function (sync or "
                    f"async), not {with_article(type(fn).__name__)}",
                    hint="Pass the function itself, not its result or its name",
                    **self._where,
                )
        self._steps.add(name)
        prefix = self._prefix(name)
        result = await self._ctx.do(f"{prefix}:{name}", action)
        if compensate is not None:
            self._compensations.append((name, prefix, compensate, result))
        return result

    async def compensate(self, trigger: BaseException | None = None) -> None:
        """Run the recorded compensations, newest first, each as a durable sub-step; one
        failing does not stop the others. Raises CompensationError when one failed (naming
        ``trigger``, the failure that made the saga compensate, when given)."""
        if not self._compensations:
            return
        self._ctx.add_history_entry(
            "saga-compensating",
            {"saga": self.name, "steps": [name for name, *_ in reversed(self._compensations)]},
        )
        while self._compensations:
            name, prefix, undo, result = self._compensations.pop()
            try:
                await self._ctx.do(f"{prefix}:undo:{name}", functools.partial(undo, result))
            except CONTROL_FLOW:
                raise
            except Exception as error:  # noqa: BLE001 - recorded; the rest still run
                self.failed[name] = _described(error)
            else:
                self.compensated.append(name)
        if self.failed:
            raise CompensationError(
                self.name,
                self.failed,
                trigger=None if trigger is None else _described(trigger),
                **self._where,
            )

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
        try:
            await self.compensate(exc)
        except CompensationError as failed:
            raise failed from exc


def _described(error: BaseException) -> str:
    """``error`` in a message about this execution: its type and text, without the where."""
    if isinstance(error, StepsourceError):
        return error.describe(where=False)
    return f"{type(error).__name__}: {error}"
