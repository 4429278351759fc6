"""Shared fixtures.

Every async test runs on asyncio and on trio (anyio's pytest plugin), and engine tests run
on every backend present: ``backend_url`` gives a fresh URL per test (a real SQLite file in
the test's temporary directory, or an in-process memory log).
"""

from __future__ import annotations

from pathlib import Path

import pytest

BACKENDS = ["memory", "sqlite"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'steps.db'}"
