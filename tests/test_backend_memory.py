"""The memory backend, the reference, passes the backend contract."""

from __future__ import annotations

import pytest

from stepsource.adapters.contract import BackendContract, make_commit
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend
from stepsource.errors import LimitExceededError


class TestMemoryBackend(BackendContract):
    def create_backend(self) -> Backend:
        return MemoryBackend()


@pytest.mark.anyio
async def test_commit_over_the_size_limit_is_refused(anyio_backend: str) -> None:
    backend = MemoryBackend()
    backend.max_commit_bytes = 10
    with pytest.raises(LimitExceededError, match="10"):
        await backend.append(make_commit("s", 0, 2, data=b"123456"))
    assert await backend.max_position() == 0
    assert await backend.append(make_commit("s", 0, 2, data=b"12345")) == 2


@pytest.mark.anyio
async def test_log_outlives_aclose(anyio_backend: str) -> None:
    backend = MemoryBackend()
    await backend.append(make_commit("s", 0))
    await backend.aclose()
    assert await backend.stream_version("s") == 1
