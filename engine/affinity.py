"""Running a thread on the core another thread runs on (Linux), so that handing work from one
to the other and back is a switch on one core rather than a wake-up of the other.

Waking a thread that sleeps on another core takes an inter-processor interrupt, which costs
tens of microseconds in a virtual machine: on a 2-core VM a bare ping-pong between two Python
threads took 45 to 50 us across the cores and 21 us with both on one. A sync ``ctx.do`` body
that the event loop's thread waits for in place (:mod:`stepsource.engine.bodies`) is one such
round trip per body, and nothing else runs on the loop meanwhile, so the body's thread gains
nothing from another core there; pinned to the loop's core for those bodies, a sequential
no-op ``ctx.do`` on memory:// took a third less CPU and ran half again as fast (interleaved
runs). A body that runs long stays on that core: nothing is lost while it holds the GIL (the
loop could not run beside it anyway), and while it waits or runs C code without the GIL the
loop's thread, which is not pinned, is moved to another core by the system's scheduler when
work comes for it. At most one pinned body thread runs at a time (a body is waited for in
place only when no other is in flight).

:func:`current_cpu` is glibc's (and musl's) ``sched_getcpu``, read through ctypes, the cheap
way the standard library lacks; elsewhere (macOS, Windows, a C library without it) it gives
None and nothing is pinned. A pin that the system refuses (the core left the process's
cpuset meanwhile) turns pinning off for that thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable

__all__ = ["Pin", "current_cpu"]


def _find_getcpu() -> Callable[[], int] | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        found = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):  # no C library to ask, or one without the function
        return None
    found.argtypes = []
    found.restype = ctypes.c_int
    return found


_GETCPU = _find_getcpu()


def current_cpu() -> int | None:
    """The core the calling thread runs on now, or None where that cannot be read."""
    if _GETCPU is None:
        return None
    cpu = _GETCPU()
    return cpu if cpu >= 0 else None


class Pin:
    """The cores one thread may run on: one given core, or those it started with."""

    __slots__ = ("allowed", "core")

    def __init__(self) -> None:
        #: the cores the thread was allowed at its start (inherited from its creator)
        self.allowed: set[int] | None = os.sched_getaffinity(0) if _GETCPU is not None else None
        #: the core the thread is pinned to now, None for all of :attr:`allowed`
        self.core: int | None = None

    def to(self, core: int | None) -> None:
        """Run the calling thread on ``core`` from now on (None: on any allowed core)."""
        if core == self.core or self.allowed is None:
            return
        allowed = self.allowed
        try:
            os.sched_setaffinity(0, allowed if core is None else {core})
        except OSError:  # the system refuses: back to every core, and no more pinning
            self.allowed = None
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, allowed)
            return
        self.core = core
