"""A worker pool raises the garbage collector's youngest threshold while it runs, and only
then: a process's own setting is kept when higher, and comes back when the last pool stops."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepsource as ss
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
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
