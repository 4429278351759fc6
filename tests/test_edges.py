"""Errors at the edge: every bad argument to the API is a StepsourceError before anything is
stored, with the same limits on every backend; the read side refuses versions past the end;
a failed step's retry count is the number of retries it had."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.aggregates import events as ev

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024


def make_engine(url: str) -> ss.Engine:
    engine = ss.Engine(url, workers=0, max_payload_bytes=LIMIT)

    @engine.step("edge.a")
    async def a(ctx: ss.StepContext, x: object = None) -> int:
        return 1

    return engine


async def refused(call: Callable[[], Awaitable[Any]]) -> ss.StepsourceError:
    with pytest.raises(ss.StepsourceError) as caught:
        await call()
    return caught.value


async def test_bad_start_arguments_are_refused_alike_on_every_backend_and_nothing_stored(
    backend_url: str,
) -> None:
    engine = make_engine(backend_url)
    big = "x" * (LIMIT + 1)
    async with engine:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: engine.start("edge.a", {"x": big}),  # an input over the payload limit
            lambda: engine.start("edge.a", {}, correlation_id={"a": 1}),  # type: ignore[call-overload]
            lambda: engine.start("edge.a", {}, correlation_id="c" * 5000),
            lambda: engine.start("edge.a", {}, correlation_id="c\ud800"),
            lambda: engine.start("edge.a", {}, priority=2**70),
            lambda: engine.start("edge.a\ud800", {}),
        ]
        for call in calls:
            error = await refused(call)
            assert "execution" in str(error)
        assert await engine.executions() == []
        handle = await engine.start("edge.a", {}, correlation_id="order-17")
        before = await engine.events(handle.execution_id)
        for message in (
            lambda: handle.signal("s" * (1024 * 1024), 1),  # a 1 MB signal name
            lambda: handle.signal("s\ud800", 1),
            lambda: handle.signal("s", big),
            lambda: handle.send_event("e", big),
            lambda: handle.update("u", big),
        ):
            error = await refused(message)
            assert handle.execution_id in str(error)
        await refused(lambda: handle.result(timeout=math.nan))
        await refused(lambda: handle.update("u", 1, timeout=math.nan))
        # nothing was posted: a worker starting now finds no message to record
        assert await engine.events(handle.execution_id) == before
        summaries = await engine.executions()
        assert [s.correlation_id for s in summaries] == ["order-17"]


async def test_versions_past_the_end_are_refused_like_zero(backend_url: str) -> None:
    engine = make_engine(backend_url)
    async with engine:
        handle = await engine.start("edge.a", {})
        last = len(await engine.events(handle.execution_id))
        assert await engine.state_of(handle.execution_id, at_version=last) == {}
        for version in (0, last + 1, 10**30):
            with pytest.raises(ss.UsageError):
                await engine.state_of(handle.execution_id, at_version=version)
            with pytest.raises(ss.UsageError):
                await engine.describe(handle.execution_id, at_version=version)
            with pytest.raises(ss.UsageError):
                await engine.history_of(handle.execution_id, at_version=version)
            with pytest.raises(ss.UsageError):  # it replayed to the end and said "ok"
                await engine.replay(handle.execution_id, at_version=version)
        # a range is named by its own argument, and the error names the execution
        with pytest.raises(ss.UsageError) as bad_range:
            await engine.events(handle.execution_id, from_version=-5)
        assert bad_range.value.reason == "from_version must be an int from 1 to 2**63-1, not -5"
        assert bad_range.value.execution_id == handle.execution_id


async def test_a_failed_step_counts_only_the_retries_it_had() -> None:
    engine = ss.Engine("memory://", poll_interval=0.01)

    @engine.step("edge.poison", max_retries=3, retry=ss.RetryPolicy(initial=0))
    async def poison(ctx: ss.StepContext) -> None:
        raise ValueError("always broken")

    @engine.step("edge.fatal", max_retries=3, retry=ss.RetryPolicy(non_retryable=(KeyError,)))
    async def fatal(ctx: ss.StepContext) -> None:
        raise KeyError("fatal")

    async with engine:
        poisoned = await engine.start("edge.poison")
        fataled = await engine.start("edge.fatal")
        for handle in (poisoned, fataled):
            with pytest.raises(ss.StepFailedError):
                await handle.result(timeout=10)
    record = await engine.describe(poisoned.execution_id)
    failures = [
        e for e in await engine.events(poisoned.execution_id) if isinstance(e, ev.AttemptFailed)
    ]
    assert len(failures) == 4
    assert (record.retry_count, record.max_retries) == (3, 3)  # retries 3/3, not 4/3
    assert (await engine.describe(fataled.execution_id)).retry_count == 0


def stepsource(*args: str | bytes, cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepsource", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
        env={**os.environ, "STEPSOURCE_URL": url},
    )


async def _seed(engine: ss.Engine) -> str:
    async with engine:
        # an input big enough that its JSON overflows a pipe's buffer
        handle = await engine.start("edge.a", {"x": "y" * (LIMIT - 100)})
    return handle.execution_id


async def _event_count(engine: ss.Engine, execution_id: str) -> int:
    async with engine:
        return len(await engine.events(execution_id))


def test_bad_cli_arguments_exit_2_without_a_traceback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    eid = anyio.run(_seed, make_engine(url))
    cases: list[tuple[str | bytes, ...]] = [
        ("show", eid, "--at", str(10**30)),
        ("show", eid, "--at", "999"),
        ("ls", "--limit", str(10**30)),
        ("show", b"\xff\xfe"),
        ("ls", "--step", b"\xff\xfe"),
        ("signal", eid, "s", "123456789012345678901234567890"),
        ("signal", eid, "s", "NaN"),
    ]
    for args in cases:
        run = stepsource(*args, cwd=tmp_path, url=url)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert "Traceback" not in run.stderr, (args, run.stderr)
    assert anyio.run(_event_count, make_engine(url), eid) == 1  # no signal was stored

    # the reader of a pipe goes away early: the CLI stops quietly
    with subprocess.Popen(
        [sys.executable, "-m", "stepsource", "events", eid, "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "STEPSOURCE_URL": url},
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr
    # a reader gone before the first line: the commands that print through rich ended with
    # status 1 (rich's own exit), failing `set -o pipefail` scripts
    for command in (["show", eid], ["history", eid], ["ls"], ["events", eid]):
        with subprocess.Popen(
            [sys.executable, "-m", "stepsource", *command],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "STEPSOURCE_URL": url},
        ) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            proc.stdout.close()
            stderr = proc.stderr.read().decode()
            assert proc.wait(timeout=60) == 0, (command, stderr)
        assert "Traceback" not in stderr, command


@pytest.mark.parametrize(
    "url",
    [
        "nats://alice:s3cr3tpw@127.0.0.1:4222?stream=A",
        "nats://s3cr3tpw@127.0.0.1:4222",
        "nats://127.0.0.1:4222?token=s3cr3tpw",
    ],
)
def test_repr_of_an_engine_never_shows_credentials(url: str) -> None:
    shown = repr(ss.Engine(url, workers=0))
    assert "s3cr3tpw" not in shown
    assert "127.0.0.1:4222" in shown


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:99999?token=s3cr3tpw",
        "nats://127.0.0.1?token=s3cr3tpw&bogus=1",
        "nats://alice:s3cr3tpw@127.0.0.1?token=s3cr3tpw",
        "nats://alice:s3cr3tpw@127.0.0.1/path",
        "sqlite://alice:s3cr3tpw@host/x.db",
    ],
)
def test_a_malformed_url_error_never_shows_credentials(url: str) -> None:
    with pytest.raises(ss.UsageError) as caught:
        ss.Engine(url, workers=0)
    assert "s3cr3tpw" not in str(caught.value)
    assert "s3cr3tpw" not in repr(caught.value)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_payload_bytes": 0}, "max_payload_bytes must be an int >= 1024, not 0"),
        ({"max_payload_bytes": 500}, "max_payload_bytes must be an int >= 1024, not 500"),
        ({"max_payload_bytes": "64k"}, "max_payload_bytes must be an int >= 1024, not '64k'"),
        ({"max_payload_bytes": True}, "max_payload_bytes must be an int >= 1024, not True"),
        ({"workers": -1}, "workers must be an int >= 0"),
        ({"lease_seconds": 0}, "lease_seconds and poll_interval must be > 0"),
        ({"snapshot_every": 0}, "snapshot_every must be an int >= 1 or None"),
        # these failed at the first operation, in a worker: an AttributeError, a TypeError
        ({"interceptors": ss.Interceptor()}, "interceptors must be a list of interceptors"),
        ({"interceptors": [object()]}, "interceptors[0] is object, which has none of the"),
        ({"clock": 5}, "clock must be a stepsource Clock, not int"),
        ({"seed": "abc"}, "seed must be bytes or None, not str"),
    ],
)
def test_engine_options_that_could_not_work_are_refused_at_construction(
    options: dict[str, Any], words: str
) -> None:
    """A payload limit under the size of an execution's first event would fail every
    execution at its start; it is refused when the engine is built, as the other options are."""
    with pytest.raises(ss.UsageError) as caught:
        ss.Engine("memory://", **options)
    assert words in str(caught.value)
    ss.Engine("memory://", max_payload_bytes=1024)  # the smallest accepted


async def test_a_payload_limit_the_backend_cannot_store_is_refused_at_start(
    tmp_path: Path,
) -> None:
    """A limit over the backend's largest commit was taken: each near-limit input was then
    refused as too large for one commit, and each near-limit state write failed its
    execution, with no word about the setting."""
    backend = SQLiteBackend(str(tmp_path / "steps.db"))
    backend.max_commit_bytes = 64 * 1024  # NATS's max_payload plays this part there
    engine = ss.Engine(backend=backend, max_payload_bytes=256 * 1024)
    with pytest.raises(ss.UsageError) as refused:
        await engine.__aenter__()
    assert refused.value.reason.startswith(
        "max_payload_bytes 262144 is more than this backend stores with an event in one commit"
    )
    assert refused.value.hint is not None
    assert "max_payload_bytes=61440 or less" in refused.value.hint
    await engine.aclose()
    small = SQLiteBackend(str(tmp_path / "steps.db"))
    small.max_commit_bytes = 64 * 1024
    async with ss.Engine(backend=small, max_payload_bytes=61440):
        pass  # the largest it can store: taken
