"""Test-only fault injection: kill this process at a named point, as a power cut would.

Set ``STEPSOURCE_TEST_KILL_AT`` to a point name (optionally ``name:N`` to die the N-th time
the point is reached, counting from 1). Unset, the hook costs one dict lookup. Points:

- ``before-first-append``: the execution is leased, nothing of this run is recorded yet
- ``after-substep-body``: a ``ctx.do`` body finished, its result is not recorded yet
- ``after-record``: a commit of the attempt was just made durable
- ``inside-wait``: the execution recorded its suspension and holds no lease
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "kill_point"]

POINTS = frozenset({"before-first-append", "after-substep-body", "after-record", "inside-wait"})
_ENV = "STEPSOURCE_TEST_KILL_AT"
_seen: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if ``STEPSOURCE_TEST_KILL_AT`` names this point (and count)."""
    target = os.environ.get(_ENV)
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
