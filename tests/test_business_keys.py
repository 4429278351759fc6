"""Business keys: ``engine.start(step, input, key=...)`` starts at most one execution per key
and step, ever — racing starts in several processes included — and starting again returns
the existing execution; ``signal_with_start`` starts or signals the one execution of a key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.engine.ids import execution_id_for_key

pytestmark = pytest.mark.anyio

DEADLINE = 30


def make(url: str) -> ss.Engine:
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("bk.order")
    async def order(ctx: ss.StepContext, amount: int) -> dict[str, Any]:
        got: list[Any] = []
        ctx.on_signal("note", got.append)
        await ctx.wait_for_condition(lambda: bool(got), timeout=60)
        return {"amount": amount, "notes": got}

    return engine


async def test_starting_a_key_again_attaches_to_the_one_execution(backend_url: str) -> None:
    engine = make(backend_url)
    async with engine:
        first = await engine.start("bk.order", {"amount": 1}, key="order-123")
        again = await engine.start("bk.order", {"amount": 999}, key="order-123")  # input ignored
        assert again.execution_id == first.execution_id
        assert engine.handle_for_key("bk.order", "order-123").execution_id == first.execution_id
        with pytest.raises(ss.VersionConflictError, match="already exists"):
            await engine.start("bk.order", {"amount": 2}, key="order-123", if_exists="error")
        signalled = await engine.signal_with_start(
            "bk.order", {"amount": 5}, key="order-123", signal="note", payload="paid"
        )
        assert signalled.execution_id == first.execution_id
        assert await first.result(timeout=DEADLINE) == {"amount": 1, "notes": ["paid"]}
        fresh = await engine.signal_with_start(
            "bk.order", {"amount": 7}, key="order-456", signal="note", payload="new"
        )
        assert await fresh.result(timeout=DEADLINE) == {"amount": 7, "notes": ["new"]}
    rows = await engine.executions(step_id="bk.order")
    assert len(rows) == 2
    # the key is shown and queryable: one execution per key, found by it
    assert {row.key for row in rows} == {"order-123", "order-456"}
    found = await engine.executions(key="order-123")
    assert [row.execution_id for row in found] == [first.execution_id]
    assert await engine.executions(key="order-999") == []
    plain = await engine.start("bk.order", {"amount": 3})  # no key: none shown
    assert (await engine.executions(limit=1))[0].key is None
    await plain.cancel()


def test_ls_filters_and_shows_business_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def seed() -> list[str]:
        engine = make(url).derive(url=url, workers=0)
        async with engine:
            keyed = await engine.start("bk.order", {"amount": 1}, key="order-777")
            await engine.start("bk.order", {"amount": 2})
        await engine.aclose()
        return [keyed.execution_id]

    (keyed,) = anyio.run(seed)

    def stepsource(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "stepsource", "--url", url, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = json.loads(stepsource("ls", "--key", "order-777", "--json"))
    assert [(r["execution_id"], r["key"]) for r in rows] == [(keyed, "order-777")]
    assert len(json.loads(stepsource("ls", "--json"))) == 2
    table = stepsource("ls")
    assert "order-777" in table


def test_cli_start_with_a_key_starts_once_and_names_the_same_execution_again(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def publish() -> None:  # a worker ran once: the step's schema is published
        async with make(url):
            pass

    anyio.run(publish)

    def start(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stepsource", "--url", url, "start", "bk.order", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    first = start('{"amount": 1}', "--key", "order-888")
    again = start('{"amount": 2}', "--key", "order-888")
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    assert first.stdout == again.stdout  # the existing execution, not a second one
    assert first.stdout.strip() == execution_id_for_key("bk.order", "order-888")
    both = start("--key", "k", "--id", "00000000-0000-4000-8000-000000000001")
    assert both.returncode == 2
    assert "give an execution_id or a key, not both" in both.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key": ""}, "non-empty str"),
        ({"key": "x" * 2000}, "at most 1024"),
        ({"key": "a\\udc80"}, "printable"),
        ({"key": "k", "execution_id": "00000000-0000-4000-8000-000000000001"}, "not both"),
        ({"key": "k", "if_exists": "replace"}, "if_exists must be"),
    ],
)
async def test_bad_keys_are_refused_before_anything_is_stored(
    options: dict[str, Any], message: str
) -> None:
    engine = make("memory://")
    if options.get("key") == "a\\udc80":
        options["key"] = "a\udc80"
    with pytest.raises(ss.UsageError, match=message):
        await engine.start("bk.order", {"amount": 1}, **options)
    assert await engine.executions() == []


@pytest.mark.parametrize(
    ("signal", "payload", "error", "text"),
    [
        ("", None, ss.UsageError, "a signal name must be a non-empty str, not an empty one"),
        ("go", {"at": {1, 2}}, ss.StateValueError, "the signal's payload['at'] is a set"),
    ],
)
async def test_signal_with_start_refuses_a_bad_signal_before_starting(
    signal: str, payload: Any, error: type[Exception], text: str
) -> None:
    """It started the execution, then failed to send the signal: the caller got an error and
    an execution it did not know had started."""
    engine = make("memory://")
    with pytest.raises(error, match=re.escape(text)):
        await engine.signal_with_start(
            "bk.order", {"amount": 1}, key="order-5", signal=signal, payload=payload
        )
    assert await engine.executions() == []


@pytest.mark.parametrize("given", ["order-123", "", 5])
async def test_an_execution_id_that_is_not_a_uuid_points_to_keys(given: object) -> None:
    """A caller's own id as execution_id was answered as a lookup ("use the execution_id of
    a handle, or list executions"), and "" quietly started under a new id."""
    engine = make("memory://")
    with pytest.raises(ss.UsageError) as refused:
        await engine.start("bk.order", {"amount": 1}, execution_id=given)  # type: ignore[call-overload]
    assert refused.value.reason == f"execution_id must be a UUID in a str, not {given!r}"
    assert refused.value.hint is not None
    assert "give it as the key instead" in refused.value.hint
    assert await engine.executions() == []


RACER = textwrap.dedent(
    """
    import sys
    import anyio
    import stepsource as ss

    async def main() -> None:
        engine = ss.Engine(sys.argv[1], workers=0)

        @engine.step("bk.order")
        async def order(ctx: ss.StepContext, amount: int) -> int:
            return amount

        ids = set()
        async with anyio.create_task_group() as tg:
            async def start(n: int) -> None:
                handle = await engine.start("bk.order", {"amount": n}, key="race-1")
                ids.add(handle.execution_id)
            for n in range(25):
                tg.start_soon(start, n)
        print(*sorted(ids))
        await engine.aclose()

    anyio.run(main)
    """
)


def test_racing_starts_of_one_key_in_two_processes_make_one_execution(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), url], stdout=subprocess.PIPE, text=True, cwd=tmp_path
        )
        for _ in range(2)
    ]
    seen = set()
    for racer in racers:
        out, _ = racer.communicate(timeout=60)
        assert racer.returncode == 0
        seen.update(out.split())
    assert len(seen) == 1  # every start of either process got the same execution

    async def count() -> int:
        engine = ss.Engine(url, workers=0)
        rows = await engine.executions(step_id="bk.order")
        events = await engine.events(rows[0].execution_id)
        await engine.aclose()
        assert [type(e).__name__ for e in events] == ["StepScheduled"]
        return len(rows)

    assert anyio.run(count) == 1
