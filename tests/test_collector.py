"""A worker pool, and a fold of the log into the executions index, raise the garbage
collector's youngest threshold while they run, and only then: a process's own setting is kept
when higher, and comes back when the last of them stops."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepsource as ss
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
from stepsource.engine.readmodels import ReadModels
from stepsource.errors import UsageError

pytestmark = pytest.mark.anyio


@pytest.fixture
def default_threshold() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def test_a_running_worker_pool_raises_the_threshold_and_its_close_restores_it(
    tmp_path: Path, anyio_backend: str, default_threshold: None
) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=2)
    seen: list[tuple[int, int, int]] = []

    @engine.step("look")
    async def look(ctx: ss.StepContext) -> None:
        seen.append(gc.get_threshold())

    async with engine:
        await (await engine.start("look")).result()
        client = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=0)
        async with client:  # a client without workers changes nothing when it closes
            pass
        assert gc.get_threshold() == (WORKER_THRESHOLD, 10, 10)
    assert seen == [(WORKER_THRESHOLD, 10, 10)]
    assert gc.get_threshold() == (700, 10, 10)


async def test_a_fold_into_the_index_raises_the_threshold_only_while_it_runs(
    tmp_path: Path, anyio_backend: str, default_threshold: None
) -> None:
    # a client engine has no worker pool: a rebuild of its index (a fold of the whole log,
    # thousands of short-lived tuples per page) raises the threshold by itself
    url = f"sqlite:///{tmp_path / 'log.db'}"
    worker = ss.Engine(url, workers=2)

    @worker.step("fill")
    async def fill(ctx: ss.StepContext) -> None:
        await ctx.set_state("n", 1)

    async with worker:
        for _ in range(3):
            await (await worker.start("fill")).result()
    assert gc.get_threshold() == (700, 10, 10)
    client = ss.Engine(url, workers=0)
    async with client:
        assert len(await client.executions()) == 3  # its own index caught up: idle now
        for threshold, expected in ((WORKER_THRESHOLD, WORKER_THRESHOLD), (None, 700)):
            seen: list[int] = []

            def folded(position: int, target: int, seen: list[int] = seen) -> None:
                seen.append(gc.get_threshold()[0])

            # an index of its own (in memory): every batch of the catch-up is this fold's
            models = ReadModels(client.store, None, batch_size=2, gc_threshold=threshold)
            assert await models.catch_up(progress=folded) > 2
            assert len(seen) > 1
            assert set(seen) == {expected}
            assert gc.get_threshold() == (700, 10, 10)


async def test_gc_threshold_none_leaves_the_collector_alone(
    tmp_path: Path, anyio_backend: str, default_threshold: None
) -> None:
    engine = ss.Engine(f"sqlite:///{tmp_path / 'log.db'}", workers=1, gc_threshold=None)
    async with engine:
        assert gc.get_threshold() == (700, 10, 10)


def test_a_higher_setting_and_a_disabled_collector_are_kept(default_threshold: None) -> None:
    gc.set_threshold(50_000, 5, 5)
    with tuned_collector(WORKER_THRESHOLD):
        assert gc.get_threshold() == (50_000, 5, 5)
    assert gc.get_threshold() == (50_000, 5, 5)
    gc.set_threshold(0, 10, 10)  # threshold 0: automatic collection is off
    with tuned_collector(WORKER_THRESHOLD):
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0


def test_pools_share_one_raise_and_a_change_made_meanwhile_stays(
    default_threshold: None,
) -> None:
    with tuned_collector(WORKER_THRESHOLD):
        with tuned_collector(WORKER_THRESHOLD):
            assert gc.get_threshold()[0] == WORKER_THRESHOLD
        assert gc.get_threshold()[0] == WORKER_THRESHOLD  # the other pool still runs
    assert gc.get_threshold() == (700, 10, 10)
    with tuned_collector(WORKER_THRESHOLD):
        gc.set_threshold(2_000, 10, 10)  # the application's own choice wins
    assert gc.get_threshold() == (2_000, 10, 10)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "many"])
def test_a_bad_gc_threshold_is_refused(bad: object) -> None:
    with pytest.raises(UsageError, match="gc_threshold"):
        ss.Engine("memory://", gc_threshold=bad)  # type: ignore[arg-type]
