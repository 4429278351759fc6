"""Services a handler looks up with ``ctx.get_service(name)``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from stepsource.errors import UnknownServiceError, UsageError

__all__ = ["UNSET", "ServiceRegistry"]

UNSET: Any = object()


class ServiceRegistry:
    """Objects registered by name, or factories called once, lazily, per engine."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._factories: dict[str, Callable[[], Any]] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, obj: Any = UNSET, *, factory: Callable[[], Any] | None = None
    ) -> None:
        if not isinstance(name, str) or not name:
            raise UsageError("a service name must be a non-empty str")
        if (obj is UNSET) == (factory is None):
            raise UsageError(
                f"register_service({name!r}, ...) takes an object or factory=..., exactly one"
            )
        with self._lock:
            self._objects.pop(name, None)
            self._factories.pop(name, None)
            if factory is not None:
                if not callable(factory):
                    raise UsageError(f"the factory of service {name!r} is not callable")
                self._factories[name] = factory
            else:
                self._objects[name] = obj

    def get(self, name: str, *, execution_id: str | None = None, step_id: str | None = None) -> Any:
        with self._lock:
            if name in self._objects:
                return self._objects[name]
            factory = self._factories.pop(name, None)
            if factory is None:
                known = ", ".join(sorted(self._objects)) or "none"
                raise UnknownServiceError(
                    f"no service named {name!r} is registered (registered: {known})",
                    execution_id=execution_id,
                    step_id=step_id,
                    hint="Call engine.register_service(name, obj) before running the step",
                )
            obj = self._objects[name] = factory()
            return obj

    def names(self) -> list[str]:
        with self._lock:
            return sorted({*self._objects, *self._factories})
