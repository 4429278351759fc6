"""The version scrubber loads each version from a snapshot near it, never by folding the log
from the start: with the early events of an execution made unreadable, every version past
them still shows (the page and ``state_of(at_version=...)``), the same as before the damage,
while a load that folds from the start fails on them."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import anyio
import pytest
from starlette.testclient import TestClient

import stepsource as ss
from stepsource.engine.ui import views

EVERY = 10  # snapshot_every
DAMAGED = range(4, 61)  # versions made unreadable (1 to 3: scheduled, leased, started)


def make_engine(url: str, snapshot_every: int | None = EVERY) -> ss.Engine:
    engine = ss.Engine(url, workers=1, poll_interval=0.02, snapshot_every=snapshot_every)

    @engine.step("scrub.long", durability="each")
    async def long(ctx: ss.StepContext) -> int:
        for i in range(150):
            await ctx.set_state("i", i)
            if i % 7 == 0:
                ctx.add_history_entry("custom", {"at": i})
        return 150

    return engine


async def build(url: str) -> tuple[str, int]:
    engine = make_engine(url)
    async with engine:
        handle = await engine.start("scrub.long")
        with anyio.fail_after(60):
            await handle.result()
    last = (await engine.describe(handle.execution_id)).version
    await engine.aclose()
    return handle.execution_id, last


async def states(url: str, execution_id: str, versions: list[int]) -> dict[int, object]:
    engine = make_engine(url, snapshot_every=None)  # every version folded from the start
    try:
        return {v: await engine.state_of(execution_id, at_version=v) for v in versions}
    finally:
        await engine.aclose()


def test_scrubber_reads_versions_from_snapshots_past_unreadable_early_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "steps.db"
    url = f"sqlite:///{path}"
    execution_id, last = anyio.run(build, url)
    versions = [DAMAGED[-1] + 2 * EVERY + 3, (last + DAMAGED[-1]) // 2 + 5, last - 1, last]
    expected = anyio.run(states, url, execution_id, versions)
    with sqlite3.connect(path) as db:
        damaged = db.execute(
            "UPDATE events SET data = x'00ff10' WHERE stream_id = ? AND version BETWEEN ? AND ?",
            (execution_id, DAMAGED[0], DAMAGED[-1]),
        ).rowcount
    assert damaged == len(DAMAGED)

    async def from_the_start() -> None:
        engine = make_engine(url, snapshot_every=None)
        try:
            await engine.state_of(execution_id, at_version=versions[0])
        finally:
            await engine.aclose()

    with pytest.raises(ss.CorruptLogError):  # the damage is where a full fold reads
        anyio.run(from_the_start)

    async def from_snapshots() -> dict[int, object]:
        engine = make_engine(url)
        try:
            return {v: await engine.state_of(execution_id, at_version=v) for v in versions}
        finally:
            await engine.aclose()

    assert anyio.run(from_snapshots) == expected

    monkeypatch.setattr(views, "HISTORY_LOOKBACK", EVERY)  # its history: only recent events
    with TestClient(make_engine(url).ui_app()) as http:
        for version in versions:
            page = http.get(f"/e/{execution_id}/versions", params={"v": version})
            assert page.status_code == 200, page.text[:2000]
            assert f'<span id="shown-version">{version}</span>' in page.text
            shown = re.search(
                r'data-key="i">\s*<th>i</th>\s*<td><pre class="value">(\d+)', page.text
            )
            assert shown is not None
            assert int(shown.group(1)) == expected[version]["i"]  # type: ignore[index]


def test_version_view_is_what_the_queries_say_at_every_version(tmp_path: Path) -> None:
    """One load per scrubber move shows exactly what state_of, describe and checkpoints_of
    say at the version and at the one before (from the ladder's snapshots and without)."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    execution_id, last = anyio.run(build, url)

    async def compare(snapshot_every: int | None, step: int) -> None:
        engine = make_engine(url, snapshot_every=snapshot_every)
        try:
            for version in [*range(1, last + 1, step), last]:
                view = await engine.version_view(execution_id, version)
                assert view.version == version
                assert view.event.originator_version == version
                assert view.state == await engine.state_of(execution_id, at_version=version)
                assert view.record == await engine.describe(execution_id, at_version=version)
                assert view.checkpoints == await engine.checkpoints_of(
                    execution_id, at_version=version
                )
                if version == 1:
                    assert (view.state_before, view.record_before) == (None, None)
                else:
                    before = version - 1
                    assert view.state_before == await engine.state_of(
                        execution_id, at_version=before
                    )
                    assert view.record_before == await engine.describe(
                        execution_id, at_version=before
                    )
            with pytest.raises(ss.UsageError, match="past the execution's last version"):
                await engine.version_view(execution_id, last + 1)
        finally:
            await engine.aclose()

    anyio.run(compare, EVERY, 1)  # every version, from snapshots
    anyio.run(compare, None, 7)  # folded from the start
