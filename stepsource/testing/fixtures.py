"""pytest fixtures for testing step handlers (loaded automatically as a pytest plugin).

- ``stepsource_clock``: a :class:`SkippingClock` that jumps idle time (sleeps run at once).
- ``stepsource_memory_engine`` / ``stepsource_sqlite_engine``: empty engines on a fresh
  in-memory log / a SQLite file in the test's temporary directory, using that clock; register
  steps on them, or copy yours with :func:`engine_for_tests`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepsource.engine.clock import Clock
from stepsource.engine.engine import Engine
from stepsource.testing.clock import SkippingClock

__all__ = [
    "engine_for_tests",
    "stepsource_clock",
    "stepsource_memory_engine",
    "stepsource_sqlite_engine",
]


def engine_for_tests(
    engine: Engine, url: str = "memory://", *, clock: Clock | None = None
) -> Engine:
    """A copy of ``engine`` (same steps and services) on ``url``, fast to poll, with a
    time-skipping clock unless one is given."""
    return engine.derive(url=url, clock=clock or SkippingClock(), poll_interval=0.005)


@pytest.fixture
def stepsource_clock() -> SkippingClock:
    return SkippingClock()


@pytest.fixture
def stepsource_memory_engine(stepsource_clock: SkippingClock) -> Engine:
    return Engine("memory://", clock=stepsource_clock, poll_interval=0.005)


@pytest.fixture
def stepsource_sqlite_engine(tmp_path: Path, stepsource_clock: SkippingClock) -> Engine:
    return Engine(f"sqlite:///{tmp_path / 'steps.db'}", clock=stepsource_clock, poll_interval=0.005)
