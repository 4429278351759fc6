"""The memory backend, the reference, passes the backend contract; a backend without a
key-value store refuses its calls."""

from __future__ import annotations

import pytest

from stepsource.adapters.contract import BackendContract, make_commit
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend
from stepsource.errors import LimitExceededError, UsageError


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


class _NoKeyValueStore(MemoryBackend):
    """A backend that implements everything but the key-value store (Backend's defaults)."""

    kv_get = Backend.kv_get
    kv_put = Backend.kv_put
    kv_compare_and_set = Backend.kv_compare_and_set
    kv_delete = Backend.kv_delete


@pytest.mark.anyio
async def test_a_backend_without_a_key_value_store_refuses_it(anyio_backend: str) -> None:
    backend = _NoKeyValueStore()
    message = "_NoKeyValueStore has no global key-value store yet"
    with pytest.raises(UsageError, match=message):
        await backend.kv_get("k", 0)
    with pytest.raises(UsageError, match=message):
        await backend.kv_put("k", b"", 0)
    with pytest.raises(UsageError, match=message):
        await backend.kv_compare_and_set("k", None, b"", 0, ttl_ms=5)
    with pytest.raises(UsageError, match=message):
        await backend.kv_delete("k", 0)
    assert await backend.append(make_commit("s", 0)) == 1  # the rest works


@pytest.mark.anyio
async def test_expired_entries_are_purged_on_later_writes(anyio_backend: str) -> None:
    backend = MemoryBackend()
    for n in range(100):
        await backend.kv_put(f"k{n}", b"", 0, ttl_ms=10)
    await backend.kv_put("k0", b"", 5, ttl_ms=100)  # its first expiry must not remove it
    await backend.kv_put("forever", b"", 20)
    assert set(backend._kv) == {"k0", "forever"}
    assert await backend.kv_get("k0", 104) is not None
    await backend.kv_delete("nothing", 105)
    assert set(backend._kv) == {"forever"}
    assert backend._kv_expiries == []
