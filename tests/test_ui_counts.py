"""The list page's counts and chart are exact for any number of executions: counted by the
executions index's database (every read-model store: the local SQLite index of the memory,
SQLite, NATS and Redis backends, PostgreSQL's own table), never by looking through a capped
number of the newest rows. The scan cap is made tiny here, so counting capped rows would
show too few."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

import stepsource as ss
from stepsource.engine.ui import views

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what is counted does not depend on the event loop


OK, BAD, WAITING = 7, 4, 3  # more executions in all than the scan cap below
CAP = 5


def make_engine(url: str, workers: int = 2) -> ss.Engine:
    engine = ss.Engine(url, workers=workers, poll_interval=0.02)

    @engine.step("count.ok")
    async def ok(ctx: ss.StepContext, n: int) -> int:
        return n

    @engine.step("count.bad")
    async def bad(ctx: ss.StepContext, n: int) -> int:
        raise RuntimeError(f"bad {n}")

    @engine.step("count.later")
    async def later(ctx: ss.StepContext, n: int) -> int:
        return n

    return engine


async def fill(engine: ss.Engine) -> None:
    """OK completed and BAD failed executions (tagged with a correlation id), then WAITING
    scheduled ones, due in a day."""
    async with engine:
        handles = [await engine.start("count.ok", {"n": n}) for n in range(OK)]
        handles += [
            await engine.start("count.bad", {"n": n}, correlation_id="batch-7") for n in range(BAD)
        ]
        with anyio.fail_after(60):
            for handle in handles:
                with contextlib.suppress(ss.StepFailedError):
                    await handle.result()
        for n in range(WAITING):
            await engine.start("count.later", {"n": n}, delay=86_400)


def chart_totals(chart: Any) -> dict[str, int]:
    totals = {"started": 0, "completed": 0, "failed": 0}
    for bar in chart.bars:
        totals[bar.kind] += bar.count
    return totals


async def test_counts_and_chart_are_exact_beyond_the_scan_cap(
    backend_url: str, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    monkeypatch.setattr(views, "SCAN_LIMIT", CAP)
    engine = make_engine(backend_url)
    await fill(engine)
    try:
        stats = await engine.execution_stats()
        expected = {"completed": OK, "failed": BAD, "scheduled": WAITING}
        assert {k: v for k, v in stats.counts.items() if v} == expected
        assert stats.total == OK + BAD + WAITING
        kinds = {k: sum(b[k] for b in stats.timeline) for k in ("started", "completed", "failed")}
        assert kinds == {"started": OK + BAD + WAITING, "completed": OK, "failed": BAD}
        assert stats.first is not None
        assert stats.last is not None
        assert stats.first <= stats.last

        view = await views.list_page(engine, views.ListFilters())
        assert {k: v for k, v in view.counts.items() if v} == expected
        assert (view.total, view.truncated) == (OK + BAD + WAITING, False)
        assert chart_totals(view.chart) == kinds
        assert len(view.rows) == OK + BAD + WAITING  # one page holds them all

        by_step = await views.list_page(engine, views.ListFilters(step="count.ok"))
        assert {k: v for k, v in by_step.counts.items() if v} == {"completed": OK}
        by_status = await views.list_page(engine, views.ListFilters(status="failed"))
        assert len(by_status.rows) == BAD
        assert by_status.total == OK + BAD + WAITING
        by_correlation = await views.list_page(engine, views.ListFilters(correlation="batch-7"))
        assert {k: v for k, v in by_correlation.counts.items() if v} == {"failed": BAD}
        assert chart_totals(by_correlation.chart) == {"started": BAD, "completed": 0, "failed": BAD}
    finally:
        await engine.aclose()


async def test_buckets_split_the_same_counts(tmp_path: Path, anyio_backend: str) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    engine = make_engine(url)
    await fill(engine)
    try:
        one = await engine.execution_stats(buckets=1)
        many = await engine.execution_stats(buckets=50)
        assert len(one.timeline) == 1
        assert len(many.timeline) == 50
        for kind in ("started", "completed", "failed"):
            assert one.timeline[0][kind] == sum(b[kind] for b in many.timeline)
        counts_only = await engine.execution_stats(buckets=0)
        assert (counts_only.counts, counts_only.timeline) == (one.counts, ())
        with pytest.raises(ss.StepsourceError, match="buckets"):
            await engine.execution_stats(buckets=-1)
    finally:
        await engine.aclose()


def test_page_shows_the_exact_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "SCAN_LIMIT", CAP)
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    anyio.run(fill, make_engine(url))
    with TestClient(make_engine(url, workers=0).ui_app()) as http:
        page = http.get("/").text
    shown = dict(re.findall(r'data-status="(\w+)">\w+ <b>(\d+)</b>', page))
    assert (shown["completed"], shown["failed"], shown["scheduled"]) == (
        str(OK),
        str(BAD),
        str(WAITING),
    )
    assert f"{OK + BAD + WAITING} in all" in page
    assert f"{OK + BAD + WAITING}+ in all" not in page
