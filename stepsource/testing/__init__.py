"""Helpers for testing step handlers.

- :func:`crash_everywhere`: crash a handler after every commit, resume it, compare.
- :class:`SkippingClock` and the pytest fixtures in :mod:`stepsource.testing.fixtures`
  (``stepsource_memory_engine``, ``stepsource_sqlite_engine``, ``stepsource_clock``).
- :mod:`stepsource.testing.strategies`: hypothesis strategies for JSON values and programs.
- :class:`~stepsource.testing.machine.ExecutionMachine`: a state machine for any backend.
- :func:`save_history` / :func:`replay_history`: golden histories replayed against new code.
"""

from stepsource.testing.clock import SkippingClock as SkippingClock
from stepsource.testing.crash import BoundaryResult as BoundaryResult
from stepsource.testing.crash import CrashReport as CrashReport
from stepsource.testing.crash import ReplayMismatch as ReplayMismatch
from stepsource.testing.crash import crash_everywhere as crash_everywhere
from stepsource.testing.fixtures import engine_for_tests as engine_for_tests
from stepsource.testing.golden import replay_history as replay_history
from stepsource.testing.golden import save_history as save_history

__all__ = [
    "BoundaryResult",
    "CrashReport",
    "ReplayMismatch",
    "SkippingClock",
    "crash_everywhere",
    "engine_for_tests",
    "replay_history",
    "save_history",
]
