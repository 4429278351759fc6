"""Schedules in one process: every slot fires once and is in the history with the execution
it started; pause, resume, trigger and delete; overlap policies; missed slots beyond the
catch-up window; refusals that name the fix; the daylight-saving rule of cron slots."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stepsource as ss
from stepsource.engine.cron import ScheduleSpec
from stepsource.testing.processes import eventually

pytestmark = pytest.mark.anyio

DEADLINE = 30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "sqlite", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "nats":
        return str(request.getfixturevalue("backend_url_nats"))
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 's.db'}"


@pytest.fixture
def backend_url_nats(nats_server: Any) -> str:
    import uuid

    return f"{nats_server.url}?stream=Q{uuid.uuid4().hex[:16]}"


def make(url: str, **options: Any) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.02, **options)

    @engine.step("job.tick")
    async def tick(ctx: ss.StepContext, label: str = "") -> str:
        return label

    @engine.step("job.slow")
    async def slow(ctx: ss.StepContext) -> str:
        return str(await ctx.wait_for_event("go", timeout=60))

    engine.enable_schedules()
    return engine


async def fired(schedule: ss.ScheduleHandle) -> list[ss.ScheduleEntry]:
    return [e for e in await schedule.history(limit=1000) if e.type == "fired"]


async def test_a_schedule_fires_every_slot_once_and_obeys_its_commands(url: str) -> None:
    engine = make(url)
    async with engine:
        schedule = await engine.schedule("ticks", "job.tick", every=1, input={"label": "t"})
        again = await engine.schedule("ticks", "job.tick", every=1, input={"label": "t"})
        assert again.name == schedule.name  # declaring it again attaches

        async def three() -> bool:
            return len(await fired(schedule)) >= 3

        await eventually("three slots", three)
        await schedule.pause()
        info = await schedule.describe()
        assert info.paused
        assert info.next_slot is None
        count = len(await engine.executions(step_id="job.tick"))
        await anyio.sleep(1.5)
        assert len(await engine.executions(step_id="job.tick")) == count  # paused: none fired
        triggered = await schedule.trigger()
        assert await triggered.result(timeout=DEADLINE) == "t"
        await schedule.resume()

        async def more() -> bool:
            return len(await fired(schedule)) >= 4

        await eventually("a slot after resuming", more)
        assert [i.name for i in await engine.schedules()] == ["ticks"]
        await schedule.delete()
        assert (await schedule.describe()).deleted
        assert await engine.schedules() == []
        with pytest.raises(ss.UsageError, match="was deleted"):
            await schedule.pause()
        history = await schedule.history(limit=1000)
        rows = await engine.executions(step_id="job.tick", limit=1000)
        runs = await engine.executions(step_id="stepsource.schedule", limit=1000)
        assert len(runs) >= 7  # one run per slot or command, chained by continue-as-new
        for run in runs:  # every run replays against the built-in step without divergence
            assert await engine.verify(run.execution_id) is None
    kinds = [entry.type for entry in history]
    assert kinds[-1] == "deleted"
    assert kinds.index("paused") < kinds.index("triggered") < kinds.index("resumed")
    slots = [entry.slot for entry in history if entry.type == "fired"]
    assert len(slots) == len(set(slots))  # each slot once
    started = {entry.execution_id for entry in history if entry.type in ("fired", "triggered")}
    assert started == {row.execution_id for row in rows}  # the history names every execution
    for entry in history:
        if entry.type == "fired":
            assert entry.slot is not None
            moment = datetime.fromisoformat(entry.slot)
            assert moment.microsecond == 0  # slots of every=1 are whole seconds


async def test_overlap_skip_and_buffer_one(tmp_path: Path) -> None:
    engine = make(f"sqlite:///{tmp_path / 's.db'}")
    async with engine:
        skip = await engine.schedule("skipper", "job.slow", every=1, overlap="skip")
        buffer = await engine.schedule("buffer", "job.slow", every=1, overlap="buffer_one")

        async def skipped_twice() -> bool:
            history = await skip.history(limit=100)
            return sum(e.type == "skipped" for e in history) >= 2

        await eventually("two skipped slots", skipped_twice)
        # one execution of each runs; the buffered schedule waits for it, holding one slot
        (_first_skip,) = await fired(skip)
        (first_buffer,) = await fired(buffer)
        assert first_buffer.execution_id is not None
        await engine.get_handle(first_buffer.execution_id).send_event("go", "done")

        async def buffered_fired() -> bool:
            return len(await fired(buffer)) >= 2

        await eventually("the buffered slot", buffered_fired)
        second = (await fired(buffer))[1]
        assert second.execution_id is not None
        # the slots that passed beside the buffered one are in the history, once each (the
        # runs recorded them, and the schedule's history left them out)
        dropped = [e for e in await buffer.history(limit=100) if e.type == "dropped"]
        assert dropped, "two slots or more passed while the first execution ran"
        for entry in dropped:
            assert entry.slot == entry.details["from"]
            assert str(entry.details["from"]) <= str(entry.details["to"])
        # the buffered slot started once the first ended, not before
        first_record = await engine.describe(first_buffer.execution_id)
        second_record = await engine.describe(second.execution_id)
        assert second_record.schedule >= first_record.updated
        await skip.delete()
        await buffer.delete()
        assert len(await fired(skip)) == 1


@pytest.mark.parametrize("command", ["pause", "delete", "trigger"])
async def test_a_buffered_slot_obeys_commands_at_once(tmp_path: Path, command: str) -> None:
    """While a buffer_one slot waits for the last execution to end, a pause or delete drops
    it (nothing starts after the command returns) and a trigger starts at once. They used to
    wait for that execution's end: a deleted schedule still started its buffered slot, and
    a trigger timed out, then ran."""
    engine = make(f"sqlite:///{tmp_path / 's.db'}")
    async with engine:
        buffer = await engine.schedule("buffer", "job.slow", every=1, overlap="buffer_one")
        await eventually("the first slot", lambda: _fired_once(buffer))
        (first,) = await fired(buffer)
        assert first.execution_id is not None
        await anyio.sleep(1.5)  # a slot passes and is buffered behind the running one
        if command == "trigger":
            with anyio.fail_after(10):  # not after the running execution's end
                triggered = await buffer.trigger()
            assert triggered.execution_id != first.execution_id
        else:
            with anyio.fail_after(10):
                await getattr(buffer, command)()
        await engine.get_handle(first.execution_id).send_event("go", "done")
        await anyio.sleep(2.5)  # a dropped slot would have started by now
        history = await buffer.history(limit=100)
        started = [e for e in history if e.type == "fired"]
        if command == "trigger":
            assert [e.type for e in history].count("triggered") == 1
        else:
            assert len(started) == 1, history  # the buffered slot never started
            (dropped,) = [e for e in history if e.type == "skipped"]
            assert dropped.details["dropped_by"] == [command]
        if command != "delete":
            await buffer.delete()


async def _fired_once(schedule: ss.ScheduleHandle) -> bool:
    return len(await fired(schedule)) >= 1


async def test_slots_missed_beyond_the_catch_up_window_are_recorded_not_fired(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    client = make(url, workers=0)
    async with client:  # no worker runs it for a while: its slots pass
        schedule = await client.schedule("late", "job.tick", every=1, catch_up=1)
        await anyio.sleep(3.5)
    worker = make(url)
    async with worker:

        async def fired_again() -> bool:
            return len(await fired(worker.get_schedule("late"))) >= 1

        await eventually("a slot inside the window", fired_again)
        history = await worker.get_schedule("late").history()
        await worker.get_schedule("late").delete()
    (missed,) = [e for e in history if e.type == "missed"]
    assert missed.slot is not None
    first_fired = next(e for e in history if e.type == "fired")
    assert first_fired.slot is not None
    assert first_fired.slot > missed.details["to"]  # type: ignore[operator]
    assert schedule.name == "late"


async def test_bad_schedules_are_refused_before_anything_is_stored() -> None:
    engine = make("memory://")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"cron": "* * * * *", "every": 5}, "exactly one"),
        ({}, "exactly one"),
        ({"every": 0.5}, "at least 1 second"),
        ({"every": 5, "overlap": "queue"}, "overlap must be one of"),
        ({"every": 5, "timezone": "Mars/Base"}, "unknown time zone"),
        ({"every": 5, "catch_up": -1}, "catch_up must be"),
        ({"every": 1e12}, "under 10\\*\\*9"),  # stored, then broke `schedules list`
        ({"every": 5, "catch_up": 1e300}, "catch_up must be a window"),
    ]
    async with engine:
        for options, message in bad:
            with pytest.raises(ss.UsageError, match=message) as caught:
                await engine.schedule("bad", "job.tick", **options)
            assert "schedule 'bad'" in str(caught.value)
            assert caught.value.hint
        # the schedule is named in every refusal (these two named only the step)
        with pytest.raises(ss.InputValidationError, match=r"^schedule 'bad': input does not"):
            await engine.schedule("bad", "job.tick", every=5, input={"label": 3})
        # the steps registered here are named (not the engine's own schedule step)
        with pytest.raises(
            ss.UnknownStepError,
            match=r"^schedule 'bad': .*\(registered: job\.slow, job\.tick\) nor",
        ):
            await engine.schedule("bad", "no.such.step", every=5)
        with pytest.raises(ss.UnknownStepError, match=r"\(registered: job\.slow, job\.tick\) nor"):
            await engine.start("no.such.step")
        assert await engine.executions() == []  # nothing was stored
        await engine.schedule("good", "job.tick", every=60)
        with pytest.raises(ss.UsageError, match="another definition"):
            await engine.schedule("good", "job.tick", every=30)
        await engine.get_schedule("good").delete()
        with pytest.raises(ss.UnknownExecutionError, match="no schedule named"):
            await engine.get_schedule("never").describe()


async def test_a_running_engine_without_schedules_refuses_to_create_one() -> None:
    engine = ss.Engine("memory://")

    @engine.step("job.tick")
    async def tick(ctx: ss.StepContext) -> None:
        return None

    async with engine:
        with pytest.raises(ss.UsageError, match="enable_schedules"):
            await engine.schedule("nightly", "job.tick", cron="0 3 * * *")


def slots(cron: str, zone: str, start: str, count: int) -> list[str]:
    spec = ScheduleSpec.build(
        "dst", cron=cron, every=None, timezone=zone, overlap="skip", catch_up=60
    )
    at = int(datetime.fromisoformat(start).timestamp() * 1000)
    found = []
    for _ in range(count):
        at = spec.next_slot(at)
        found.append(datetime.fromtimestamp(at / 1000, ZoneInfo(zone)).isoformat())
    return found


def test_daylight_saving_gaps_and_repeats_follow_the_documented_rule() -> None:
    # a fixed time in the spring-forward gap fires once, at the first instant after it
    assert slots("30 2 * * *", "Europe/Paris", "2026-03-28T12:00:00+00:00", 2) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    # a fixed time in the repeated hour fires once, at its first occurrence
    assert slots("30 2 * * *", "Europe/Paris", "2026-10-24T12:00:00+00:00", 2) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    # a wildcard hour follows elapsed time: every half hour straight through the repeat
    assert slots("*/30 * * * *", "Europe/Paris", "2026-10-25T00:10:00+00:00", 4) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


CRONS = ["* * * * * *", "*/5 * * * *", "0 9 * * MON-FRI", "30 2 * * *", "0 0 1 * *"]


@settings(max_examples=60, deadline=None)
@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]),
    at=st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000),
    every=st.integers(min_value=1, max_value=100_000),
)
def test_property_slots_are_ordered_and_found_from_both_sides(
    cron: str, zone: str, at: int, every: int
) -> None:
    """The next slot is after the moment, the slot before is before it, nothing lies between
    them; every= slots are the period's multiples since the epoch."""
    spec = ScheduleSpec.build("p", cron=cron, every=None, timezone=zone, overlap="skip", catch_up=1)
    upcoming = spec.next_slot(at)
    previous = spec.slot_before(at + 1)  # at or before the moment
    assert previous <= at < upcoming
    assert spec.next_slot(previous) == upcoming
    periodic = ScheduleSpec.build(
        "p", cron=None, every=timedelta(seconds=every), timezone="UTC", overlap="skip", catch_up=1
    )
    nxt = periodic.next_slot(at)
    assert nxt % (every * 1000) == 0
    assert at < nxt <= at + every * 1000
    assert periodic.slot_before(nxt) == nxt - every * 1000
    assert datetime.fromtimestamp(nxt / 1000, UTC).tzinfo is UTC


async def test_the_schedules_command_lists_shows_and_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    engine = make(url)

    async def stepsource(*args: str) -> str:
        done = await anyio.run_process(
            [sys.executable, "-m", "stepsource", "--url", url, "schedules", *args], check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    async with engine:
        await engine.schedule("cli-ticks", "job.tick", every=1, input={"label": "c"})
        await eventually("a slot", lambda: _has_fired(engine, "cli-ticks"))
        (listed,) = json.loads(await stepsource("list", "--json"))
        assert listed["name"] == "cli-ticks"
        assert listed["every"] == 1
        assert not listed["paused"]
        await stepsource("pause", "cli-ticks")
        assert (await engine.get_schedule("cli-ticks").describe()).paused
        started = json.loads(await stepsource("trigger", "cli-ticks", "--json"))["execution_id"]
        assert await engine.get_handle(started).result(timeout=DEADLINE) == "c"
        shown = json.loads(await stepsource("show", "cli-ticks", "--json"))
        kinds = [entry["type"] for entry in shown["history"]]
        assert "fired" in kinds
        assert kinds[-2:] == ["paused", "triggered"]
        assert shown["history"][-1]["execution_id"] == started
        assert "cli-ticks" in await stepsource("show", "cli-ticks")
        assert "resumed" in await stepsource("resume", "cli-ticks")
        assert "deleted" in await stepsource("delete", "cli-ticks")
        assert json.loads(await stepsource("list", "--json")) == []
    missing = await anyio.run_process(
        [sys.executable, "-m", "stepsource", "--url", url, "schedules", "pause", "nope"],
        check=False,
    )
    assert missing.returncode == 2
    assert "no schedule named 'nope'" in missing.stderr.decode()
    # no worker runs the schedule now: the command is not taken in time, which is no usage
    # error (it exited 2, as for a typo, after 30 s)
    async with make(url, workers=0) as client:
        await client.schedule("idle", "job.tick", every=60)
    unheard = await anyio.run_process(
        [*STEPSOURCE, "--url", url, "schedules", "pause", "idle", "--timeout", "0.5"],
        check=False,
    )
    assert unheard.returncode == 1, unheard.stderr.decode()
    assert "did not receive the pause command within 0.5 s" in unheard.stderr.decode()


STEPSOURCE = (sys.executable, "-m", "stepsource")


async def _has_fired(engine: ss.Engine, name: str) -> bool:
    return bool(await fired(engine.get_schedule(name)))
