"""``Secret``: a value that never shows in logs, reprs, errors or the log of events.

Wrap credentials you hand to handlers (through a service or a closure) so an accidental
``print``, ``ctx.log(..., key=secret)`` or exception message shows ``Secret('********')``.
The handler reads the value with :meth:`Secret.reveal`. A Secret is not JSON: recording one
(in state, input, output, details) is refused with StateValueError — keep secrets out of the
log; encrypt what must be stored with ``Engine(cipher_key=...)``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Secret"]

T = TypeVar("T")
_MASK = "********"


class Secret(Generic[T]):
    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        """The wrapped value. Do not log it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("stepsource.Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be serialized")
