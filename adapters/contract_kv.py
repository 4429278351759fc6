"""The global key-value store's part of the backend contract (TTL, revisions, CAS)."""

from __future__ import annotations

from collections.abc import Awaitable

import anyio
import anyio.to_thread
import pytest

from stepsource.adapters.contract_support import kv_increment
from stepsource.adapters.ports import Backend, KVEntry, kv_scan_all
from stepsource.errors import LimitExceededError, UsageError

__all__ = ["KVContract"]


class KVContract:
    """Mixed into :class:`~stepsource.adapters.contract.BackendContract`."""

    def reopen(self, backend: Backend) -> Backend:  # overridden by BackendContract
        return backend

    # -- the global key-value store ---------------------------------------------------------
    @pytest.mark.anyio
    async def test_kv_get_put_round_trip(self, backend: Backend) -> None:
        assert await backend.kv_get("k", 0) is None
        entry = await backend.kv_put("k", b"\x00\xffvalue", 10)
        assert entry == KVEntry("k", b"\x00\xffvalue", entry.revision, None)
        assert entry.revision > 0
        assert await backend.kv_get("k", 10) == entry
        assert await backend.kv_get("k", 2**63 - 1) == entry  # no TTL: never expires
        assert await backend.kv_get("K", 10) is None  # keys are case-sensitive
        odd = ["a.b", "*", ">", "with space", "ключ/ü 🙂", "k" * 512, "é" * 512, "$KV.x"]
        written = {key: await backend.kv_put(key, key.encode(), 11) for key in odd}
        for key in odd:  # keys are opaque text: a backend with a narrower syntax encodes them
            assert await backend.kv_get(key, 12) == written[key]
            assert written[key].data == key.encode()
        empty = await backend.kv_put("empty", b"", 12)
        assert empty.data == b""
        assert type(empty.data) is bytes
        got = await backend.kv_get("empty", 12)
        assert got is not None
        assert type(got.data) is bytes
        assert await backend.kv_get("k", 13) == entry  # the others left it alone

    @pytest.mark.anyio
    async def test_kv_revisions_increase(self, backend: Backend) -> None:
        seen = []
        for n in range(5):
            seen.append((await backend.kv_put("k", b"%d" % n, n)).revision)
            await backend.kv_put(f"other-{n}", b"", n)
        cas = await backend.kv_compare_and_set("k", seen[-1], b"cas", 5)
        assert cas is not None
        seen.append(cas.revision)
        await backend.kv_delete("k", 6)
        seen.append((await backend.kv_put("k", b"after delete", 7, ttl_ms=1)).revision)
        # expired at 8: written again, it still gets a revision above every earlier one
        again = await backend.kv_compare_and_set("k", None, b"after expiry", 8)
        assert again is not None
        seen.append(again.revision)
        assert seen == sorted(set(seen))
        assert seen[0] > 0

    @pytest.mark.anyio
    async def test_kv_ttl_expiry(self, backend: Backend) -> None:
        entry = await backend.kv_put("k", b"v", 1000, ttl_ms=100)
        forever = await backend.kv_put("forever", b"f", 1000)
        assert entry.expires_ms == 1100
        for now in (1000, 1050, 1099):
            assert await backend.kv_get("k", now) == entry
        for now in (1100, 1101, 10**12):
            assert await backend.kv_get("k", now) is None
        assert await backend.kv_get("forever", 10**12) == forever
        # expired, the key is absent to compare-and-set too
        assert await backend.kv_compare_and_set("k", entry.revision, b"stale", 1100) is None
        renewed = await backend.kv_compare_and_set("k", None, b"new", 1100, ttl_ms=50)
        assert renewed is not None
        assert renewed == KVEntry("k", b"new", renewed.revision, 1150)
        assert await backend.kv_get("k", 1149) == renewed
        kept = await backend.kv_put("k", b"no ttl", 1149)  # a put without TTL removes it
        assert kept.expires_ms is None
        assert await backend.kv_get("k", 10**12) == kept
        latest = 2**63 - 1
        edge = await backend.kv_put("edge", b"", latest - 10, ttl_ms=10)
        assert edge.expires_ms == latest
        assert await backend.kv_get("edge", latest - 1) == edge
        assert await backend.kv_get("edge", latest) is None

    @pytest.mark.anyio
    async def test_kv_rate_limit_window(self, backend: Backend) -> None:
        """A fixed-window rate limit: at most 3 calls per 1000 ms window, the window's
        counter expiring with it (each increment keeps the window's original expiry)."""

        async def allow(now_ms: int) -> bool:
            while True:
                entry = await backend.kv_get("rate:api", now_ms)
                if entry is None:
                    first = await backend.kv_compare_and_set(
                        "rate:api", None, b"1", now_ms, ttl_ms=1000
                    )
                    if first is not None:
                        return True
                    continue
                if int(entry.data) >= 3:
                    return False
                assert entry.expires_ms is not None
                counted = await backend.kv_compare_and_set(
                    "rate:api",
                    entry.revision,
                    b"%d" % (int(entry.data) + 1),
                    now_ms,
                    ttl_ms=entry.expires_ms - now_ms,
                )
                if counted is not None:
                    assert counted.expires_ms == entry.expires_ms
                    return True

        calls = [0, 100, 200, 300, 999, 1000, 1001, 1500, 1999, 2000]
        assert [await allow(now) for now in calls] == [
            *(True, True, True, False, False),  # window 0..999
            *(True, True, True, False),  # window 1000..1999
            True,
        ]

    @pytest.mark.anyio
    async def test_kv_scan_lists_every_live_entry(self, backend: Backend) -> None:
        assert await backend.kv_scan(0) == ([], "")
        odd = ["a.b", "*", "[x]?", "with space", "ключ/ü 🙂", "k" * 512, "$KV.x", "\\"]
        keys = [f"key-{n:02d}" for n in range(23)] + odd
        written = {key: await backend.kv_put(key, key.encode(), 100) for key in keys}
        for key in keys[:5]:  # expiring ones: live until 200
            written[key] = await backend.kv_put(key, b"ttl " + key.encode(), 100, ttl_ms=100)
        await backend.kv_put("gone", b"", 100)
        await backend.kv_delete("gone", 100)
        await backend.kv_put("expired", b"", 100, ttl_ms=1)
        for limit in (1, 7, 1000):
            assert await kv_scan_all(backend, 150, limit) == written
        later = {key: entry for key, entry in written.items() if key not in keys[:5]}
        assert await kv_scan_all(backend, 200, 4) == later
        page, cursor = await backend.kv_scan(150, "", 1000)
        assert (sorted(e.key for e in page), cursor) == (sorted(written), "")
        with pytest.raises(UsageError, match="limit of a key-value scan"):
            await backend.kv_scan(150, "", 0)

    @pytest.mark.anyio
    async def test_kv_compare_and_set(self, backend: Backend) -> None:
        created = await backend.kv_compare_and_set("k", None, b"one", 0)
        assert created is not None
        assert created == KVEntry("k", b"one", created.revision, None)
        assert await backend.kv_compare_and_set("k", None, b"dup", 1) is None  # present
        second = await backend.kv_compare_and_set("k", created.revision, b"two", 2, ttl_ms=5)
        assert second is not None
        assert second == KVEntry("k", b"two", second.revision, 7)
        assert second.revision > created.revision
        for expected in (created.revision, second.revision + 1, 10**15):  # stale, unknown
            assert await backend.kv_compare_and_set("k", expected, b"no", 3) is None
        assert await backend.kv_get("k", 3) == second  # a refused CAS wrote nothing
        assert await backend.kv_compare_and_set("absent", second.revision, b"no", 3) is None
        assert await backend.kv_compare_and_set("absent", created.revision, b"no", 3) is None
        assert await backend.kv_get("absent", 3) is None
        third = await backend.kv_compare_and_set("k", second.revision, b"three", 6)
        assert third is not None
        assert third.expires_ms is None  # the TTL belongs to one write
        assert await backend.kv_get("k", 100) == third

    @pytest.mark.anyio
    async def test_kv_delete(self, backend: Backend) -> None:
        await backend.kv_delete("never", 0)  # absent: nothing happens
        entry = await backend.kv_put("k", b"v", 0)
        other = await backend.kv_put("other", b"o", 0)
        await backend.kv_delete("k", 1)
        assert await backend.kv_get("k", 1) is None
        assert await backend.kv_get("other", 1) == other
        await backend.kv_delete("k", 2)  # twice: still fine
        assert await backend.kv_compare_and_set("k", entry.revision, b"stale", 3) is None
        assert await backend.kv_get("k", 3) is None
        back = await backend.kv_compare_and_set("k", None, b"back", 3, ttl_ms=2)
        assert back is not None
        assert back.revision > entry.revision
        await backend.kv_delete("k", 10)  # expired already: fine too
        assert await backend.kv_get("k", 4) is None  # deleted, not merely expired

    @pytest.mark.anyio
    async def test_kv_bad_input_is_refused_before_writing(self, backend: Backend) -> None:
        def every_call(key: object, now: object) -> list[Awaitable[object]]:
            return [
                backend.kv_get(key, now),  # type: ignore[arg-type]
                backend.kv_put(key, b"v", now),  # type: ignore[arg-type]
                backend.kv_compare_and_set(key, None, b"v", now),  # type: ignore[arg-type]
                backend.kv_delete(key, now),  # type: ignore[arg-type]
            ]

        bad_keys: list[object] = ["", "k" * 513, "a\x00b", "\ud800", 7, b"k", None]
        bad_times: list[object] = [2**63, -(2**63) - 1, 1.5, True, "0", None]
        calls = [call for key in bad_keys for call in every_call(key, 0)]
        calls += [call for now in bad_times for call in every_call("k", now)]
        for call in calls:
            with pytest.raises(UsageError):
                await call
        bad_ttls: list[object] = [0, -5, 2**63, True, 1.0, "10"]
        for ttl in bad_ttls:
            with pytest.raises(UsageError):
                await backend.kv_put("k", b"v", 0, ttl_ms=ttl)  # type: ignore[arg-type]
            with pytest.raises(UsageError):
                await backend.kv_compare_and_set("k", None, b"v", 0, ttl)  # type: ignore[arg-type]
        with pytest.raises(UsageError):  # expires beyond 64 bits
            await backend.kv_put("k", b"v", 2**63 - 10, ttl_ms=10)
        bad_revisions: list[object] = [0, -1, 2**63, True, "1", 1.0]
        for revision in bad_revisions:
            with pytest.raises(UsageError):
                await backend.kv_compare_and_set("k", revision, b"v", 0)  # type: ignore[arg-type]
        bad_data: list[object] = ["text", None, 5, [1]]
        for data in bad_data:
            with pytest.raises(UsageError):
                await backend.kv_put("k", data, 0)  # type: ignore[arg-type]
        too_big = b"x" * (backend.max_commit_bytes + 1)
        with pytest.raises(LimitExceededError):
            await backend.kv_put("k", too_big, 0)
        with pytest.raises(LimitExceededError):
            await backend.kv_compare_and_set("k", None, too_big, 0)
        assert await backend.kv_get("k", 0) is None
        ok = await backend.kv_compare_and_set("k", None, b"v", 0)  # nothing was written before
        assert ok is not None

    @pytest.mark.anyio
    async def test_kv_racing_compare_and_set_one_wins(self, backend: Backend) -> None:
        for round_ in range(5):
            current = await backend.kv_get("k", round_)
            revision = None if current is None else current.revision
            results: dict[int, KVEntry | None] = {}

            async def attempt(
                task: int, revision: int | None, now: int, into: dict[int, KVEntry | None]
            ) -> None:
                into[task] = await backend.kv_compare_and_set("k", revision, b"%d" % task, now)

            async with anyio.create_task_group() as group:
                for task in range(10):
                    group.start_soon(attempt, task, revision, round_, results)
            winners = [entry for entry in results.values() if entry is not None]
            assert len(winners) == 1, results
            assert await backend.kv_get("k", round_) == winners[0]

    @pytest.mark.anyio
    async def test_kv_counter_from_threads(self, backend: Backend, anyio_backend: str) -> None:
        """Threads, each with its own loop (and, where the backend has them, connections),
        increment one counter by compare-and-set with retries: no increment is lost."""
        threads, increments = 4, 15
        attempts = [0] * threads

        def count_in_own_loop(thread: int) -> None:
            async def run() -> None:
                store = self.reopen(backend)
                for _ in range(increments):
                    attempts[thread] += 1
                    while await kv_increment(store, "counter", 0) is None:
                        attempts[thread] += 1
                if store is not backend:
                    await store.aclose()

            anyio.run(run, backend=anyio_backend)

        async with anyio.create_task_group() as group:
            for thread in range(threads):
                group.start_soon(anyio.to_thread.run_sync, count_in_own_loop, thread)
        final = await backend.kv_get("counter", 0)
        assert final is not None
        assert int(final.data) == threads * increments <= sum(attempts)

    @pytest.mark.anyio
    async def test_kv_survives_aclose_and_reopening(self, backend: Backend) -> None:
        entry = await backend.kv_put("k", b"v", 0, ttl_ms=1000)
        await backend.aclose()
        assert await backend.kv_get("k", 1) == entry
        other = self.reopen(backend)
        assert await other.kv_get("k", 2) == entry
        newer = await other.kv_compare_and_set("k", entry.revision, b"w", 3)
        if other is not backend:
            await other.aclose()
        assert newer is not None
        assert await backend.kv_get("k", 4) == newer
        assert newer.revision > entry.revision
