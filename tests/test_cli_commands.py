"""The real ``stepsource`` entry point in subprocesses, against SQLite files populated by real
executions of ``cli_app_v1`` (imported by the subprocesses with PYTHONPATH=tests).

Checked: what each command prints (tables for people, JSON for programs) and its exit code:
0 ok, 1 a problem found (a divergence), 2 a user error, 3 a backend that cannot be used.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import cli_app_v1  # noqa: E402

DEADLINE = 30.0
STEPSOURCE = str(Path(sys.executable).parent / "stepsource")
V1, V2 = "cli_app_v1:engine", "cli_app_v2:engine"


def env_for(url: str, **extra: str) -> dict[str, str]:
    # the terminal's own settings stay out: output to a pipe is as wide as the CLI makes it
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STEPSOURCE_") and k not in ("COLUMNS", "LINES")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["STEPSOURCE_URL"] = url
    env.update(extra)
    return env


def run(url: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STEPSOURCE, *args],
        env=env_for(url, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(url: str, *args: str) -> str:
    done = run(url, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def _populate(url: str) -> dict[str, Any]:
    engine = cli_app_v1.engine.derive(url=url, workers=4)
    async with engine:
        orders = [await engine.start("cli.order", {"items": [n, n + 1]}) for n in range(3)]
        flaky = await engine.start("cli.flaky", {"n": 5})
        waiter = await engine.start("cli.waiter", {"name": "go"})
        for handle in [*orders, flaky]:
            await handle.result(timeout=DEADLINE)
        with anyio.fail_after(DEADLINE):
            while not await engine.executions(status="waiting"):
                await anyio.sleep(0.02)
    await engine.aclose()
    return {
        "orders": [h.execution_id for h in orders],
        "flaky": flaky.execution_id,
        "waiter": waiter.execution_id,
    }


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """Three orders, a flaky step (two attempts), a waiter; read-only for the tests below."""
    path = tmp_path_factory.mktemp("cli") / "steps.db"
    url = f"sqlite:///{path}"
    return url, anyio.run(_populate, url)


# -- listing and looking ---------------------------------------------------------------------
def test_ls_lists_newest_first_with_filters_and_pages(
    populated: tuple[str, dict[str, Any]],
) -> None:
    url, ids = populated
    rows = json.loads(ok(url, "ls", "--json"))
    newest_first = [ids["waiter"], ids["flaky"], *ids["orders"][::-1]]
    assert [r["execution_id"] for r in rows] == newest_first
    assert [r["status"] for r in rows] == ["waiting", "completed", *["completed"] * 3]
    assert rows[1]["attempt"] == 2
    assert rows[1]["last_error"]["type"] == "ConnectionError"

    orders = json.loads(ok(url, "ls", "--step", "cli.order", "--json"))
    assert [r["execution_id"] for r in orders] == ids["orders"][::-1]
    waiting = json.loads(ok(url, "ls", "--status", "waiting", "--json", "--url", url))
    assert [r["execution_id"] for r in waiting] == [ids["waiter"]]
    assert json.loads(ok(url, "ls", "--since", "2999-01-01", "--json")) == []

    page = ok(url, "ls", "--limit", "2")  # the table, and how to get the next page
    assert ids["waiter"] in page
    assert ids["flaky"] in page
    assert "cli.flaky@1" in page
    assert f"stepsource ls --cursor {ids['flaky']}" in page
    second = json.loads(ok(url, "ls", "--limit", "2", "--cursor", ids["flaky"], "--json"))
    assert [r["execution_id"] for r in second] == ids["orders"][::-1][:2]
    third = json.loads(ok(url, "ls", "--limit", "2", "--offset", "4", "--json"))
    assert [r["execution_id"] for r in third] == [ids["orders"][0]]

    bad = run(url, "ls", "--status", "done")
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr
    bad_cursor = run(url, "ls", "--cursor", "00000000-0000-4000-8000-000000000000")
    assert bad_cursor.returncode == 2
    assert "not an execution in the index" in bad_cursor.stderr


def test_show_history_and_events(populated: tuple[str, dict[str, Any]]) -> None:
    url, ids = populated
    order = ids["orders"][0]
    shown = ok(url, "show", order)
    assert f"{order} cli.order@1.0.0: completed" in shown
    assert 'output {"total":1}' in shown
    early = json.loads(ok(url, "show", order, "--at", "4", "--json"))
    assert early["state"] == {"status": "pricing"}
    assert early["record"]["status"] == "executing"

    history = json.loads(ok(url, "history", order, "--json"))
    assert [h["type"] for h in history] == [
        "started",
        "state-set",
        "checkpoint",
        "state-set",
        "custom",
        "state-set",
        "completed",
    ]
    assert "custom" in ok(url, "history", order)

    events = json.loads(ok(url, "events", order, "--json"))
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "StepScheduled"
    assert events[-1]["type"] == "StepCompleted"
    assert "SubStepCompleted" in ok(url, "events", order)
    # a range of versions: a large execution's table of every event took minutes
    ranged = json.loads(ok(url, "events", order, "--from", "2", "--to", "3", "--json"))
    assert [e["version"] for e in ranged] == [2, 3]
    assert [
        e["version"] for e in json.loads(ok(url, "events", order, "--from", "8", "--json"))
    ] == [e["version"] for e in events[7:]]

    nobody = "00000000-0000-4000-8000-000000000000"
    for args in (("show", nobody), ("events", nobody), ("replay", nobody, "--app", V1)):
        unknown = run(url, *args)
        assert unknown.returncode == 2, args
        assert "no such execution" in unknown.stderr
    not_an_id = run(url, "show", "order-1")
    assert not_an_id.returncode == 2
    assert "is not an execution id" in not_an_id.stderr


# -- replay and verify -----------------------------------------------------------------------
def test_replay_reports_each_attempt_and_the_first_divergence(
    populated: tuple[str, dict[str, Any]],
) -> None:
    url, ids = populated
    order = ids["orders"][0]
    same = run(url, "replay", order, "--app", V1)
    assert same.returncode == 0, same.stderr
    assert "ok: the code replays the record exactly" in same.stdout

    changed = run(url, "replay", order, "--app", V2)
    assert changed.returncode == 1, changed.stderr
    assert (
        "set_state('subtotal') was attempted where set_state('total') was recorded at version 7"
        in changed.stdout
    )
    before = run(url, "replay", order, "--app", V2, "--at", "6")
    assert before.returncode == 0, before.stderr
    assert "reached the end of the record" in before.stdout

    flaky = json.loads(ok(url, "replay", ids["flaky"], "--app", V1, "--json"))
    assert flaky["ok"] is True
    assert [a["attempt"] for a in flaky["attempts"]] == [1, 2]
    assert flaky["attempts"][0]["outcome"].startswith("raised ConnectionError")
    as_json = run(url, "replay", order, "--app", V2, "--json")
    assert as_json.returncode == 1
    divergence = json.loads(as_json.stdout)["divergence"]
    assert divergence["version"] == 7
    assert divergence["recorded"] == "set_state('total')"


def test_an_app_engine_naming_its_own_url_needs_no_url_option(tmp_path: Path) -> None:
    """``verify --app`` (and ``ui --app``) serve the app's engine, whose URL names its log:
    without --url they refused, "cannot read ./stepsource.db: there is no such file"."""
    log = tmp_path / "own.db"
    (tmp_path / "own_app.py").write_text(
        "import stepsource as ss\n"
        f"engine = ss.Engine({f'sqlite:///{log}'!r}, workers=2)\n"
        "@engine.step('own.echo')\n"
        "async def echo(ctx: ss.StepContext, n: int) -> int:\n"
        "    return n\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import own_app  # type: ignore[import-not-found]

        async def one() -> None:
            async with own_app.engine:
                await (await own_app.engine.start("own.echo", {"n": 1})).result(timeout=30)

        anyio.run(one)
    finally:
        sys.path.remove(str(tmp_path))
    elsewhere = tmp_path / "elsewhere"  # no stepsource.db here
    elsewhere.mkdir()
    env = {k: v for k, v in env_for("").items() if k != "STEPSOURCE_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    done = subprocess.run(
        [STEPSOURCE, "verify", "--app", "own_app:engine"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified 1 executions: 1 ok, 0 diverged" in done.stdout
    assert not (elsewhere / "stepsource.db").exists()


def test_verify_passes_on_the_recording_code_and_fails_on_a_changed_handler(
    populated: tuple[str, dict[str, Any]],
) -> None:
    url, ids = populated
    same = run(url, "verify", "--app", V1)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "verified 5 executions: 5 ok, 0 diverged" in same.stdout
    assert "verifying" in same.stderr  # the progress bar

    changed = run(url, "verify", "--app", V2)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "verified 5 executions: 2 ok, 3 diverged" in changed.stdout
    for order in ids["orders"]:
        assert order in changed.stderr  # each divergence, above the progress bar
    report = json.loads(run(url, "verify", "--app", V2, "--json").stdout)
    assert report["diverged"] == 3
    assert {r["execution_id"] for r in report["results"] if not r["ok"]} == set(ids["orders"])

    only_flaky = run(url, "verify", "--app", V2, "--step", "cli.flaky")
    assert only_flaky.returncode == 0
    assert "verified 1 executions: 1 ok, 0 diverged" in only_flaky.stdout

    no_app = run(url, "verify")
    assert no_app.returncode == 2
    assert "--app MODULE:ENGINE" in no_app.stderr
    missing = run(url, "verify", "--app", "no_such_module:engine")
    assert missing.returncode == 2
    assert "cannot import 'no_such_module'" in missing.stderr


# -- the read models -------------------------------------------------------------------------
def _index_dump(path: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path + ".readmodels")
    try:
        return [tuple(r) for r in conn.execute("SELECT * FROM executions ORDER BY position")]
    finally:
        conn.close()


def test_projections_rebuild_is_byte_equal_under_different_hash_seeds(
    populated: tuple[str, dict[str, Any]],
) -> None:
    url, _ = populated
    dumps = []
    for seed in ("1", "4242"):
        rebuilt = run(url, "projections", "rebuild", PYTHONHASHSEED=seed)
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "rebuilt the executions index: 5 executions from" in rebuilt.stdout
        assert "rebuilding the executions index" in rebuilt.stderr  # the progress bar
        listed = run(url, "ls", "--json", "--limit", "1000", PYTHONHASHSEED=seed)
        dumps.append((listed.stdout.encode(), repr(_index_dump(url.removeprefix("sqlite:///")))))
    assert dumps[0] == dumps[1]
    report = json.loads(ok(url, "projections", "rebuild", "--json"))
    assert report["executions"] == 5


def test_unreachable_backends_and_bad_urls(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    for args in (("ls",), ("projections", "rebuild"), ("tail", "--limit", "1")):
        done = run(missing, *args)
        assert done.returncode == 3, (args, done.stderr)
        assert "error:" in done.stderr
    bad = run("mysql://nowhere/x", "export", "--to", f"sqlite:///{tmp_path / 'copy.db'}")
    assert bad.returncode == 2
    assert "unknown scheme" in bad.stderr
    # a copy into memory:// would end with the command: refused, before anything is read
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    anyio.run(cli_app_v1.engine.derive(url=url, workers=0).start, "cli.order", {"items": [1]})
    lost = run(url, "export", "--to", "memory://")
    assert lost.returncode == 2
    assert "the copy would be lost at once" in lost.stderr


# -- following the log and sending messages --------------------------------------------------
def test_tail_prints_one_line_per_new_event_and_stops_after_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    client = cli_app_v1.engine.derive(url=url, workers=0)
    first = anyio.run(client.start, "cli.order", {"items": [1]})  # before tail: not printed
    err = tmp_path / "tail.err"
    with err.open("w") as sink:
        tail = subprocess.Popen(
            [STEPSOURCE, "tail", "--json", "--limit", "3"],
            env=env_for(url),
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    try:
        deadline = time.monotonic() + DEADLINE
        while "following the log from position 1" not in err.read_text():
            assert tail.poll() is None, err.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = [
            anyio.run(client.start, "cli.order", {"items": [n]}).execution_id for n in range(3)
        ]
        out, _ = tail.communicate(timeout=DEADLINE)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 0, err.read_text()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["execution_id"], x["type"], x["version"]) for x in lines] == [
        (eid, "StepScheduled", 1) for eid in started
    ]
    assert [x["position"] for x in lines] == [2, 3, 4]
    assert all(x["step_id"] == "cli.order" for x in lines)
    # each line carries the event's data, as `events --json` does
    assert [x["data"]["input"] for x in lines] == [{"items": [n]} for n in range(3)]
    assert first.execution_id not in out
    anyio.run(client.aclose)


def test_signal_send_event_and_cancel_reach_the_execution(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"

    async def start_waiters() -> list[str]:
        engine = cli_app_v1.engine.derive(url=url, workers=2)
        async with engine:
            handles = [await engine.start("cli.waiter", {"name": "go"}) for _ in range(2)]
            with anyio.fail_after(DEADLINE):
                while len(await engine.executions(status="waiting")) < 2:
                    await anyio.sleep(0.02)
        return [h.execution_id for h in handles]

    kept, cancelled = anyio.run(start_waiters)
    assert "sent signal 'nudge'" in ok(url, "signal", kept, "nudge", '{"n": 1}')
    assert "sent event 'go'" in ok(url, "send-event", kept, "go", '"yes"')
    assert "asked" in ok(url, "cancel", cancelled, "--reason", "not needed")

    async def finish() -> tuple[Any, ss.StepRecord]:
        engine = cli_app_v1.engine.derive(url=url, workers=2)
        async with engine:
            result = await engine.get_handle(kept).result(timeout=DEADLINE)
            with pytest.raises(ss.StepCancelledError, match="not needed"):
                await engine.get_handle(cancelled).result(timeout=DEADLINE)
        return result, await engine.describe(cancelled)

    result, record = anyio.run(finish)
    assert result == {"received": "yes", "signals": [{"n": 1}]}
    assert record.status == "cancelled"

    ended = run(url, "signal", kept, "nudge")
    assert ended.returncode == 2
    assert "already ended" in ended.stderr
    bad_json = run(url, "send-event", kept, "go", "{not json")
    assert bad_json.returncode == 2
    assert "is not JSON" in bad_json.stderr
    unknown = run(url, "cancel", "00000000-0000-4000-8000-000000000000")
    assert unknown.returncode == 2
    assert "no such execution" in unknown.stderr


def test_user_text_is_printed_as_stored_never_as_markup(tmp_path: Path) -> None:
    """An error, a key or a schedule name holding rich markup (``[/x]``, ``[bold]``) is
    printed exactly; one such row used to make `ls` and `schedules list` fail for the whole
    backend (a MarkupError traceback, exit 1) and hid other text."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    engine = ss.Engine(url, workers=1, poll_interval=0.02)

    @engine.step("cli.markup")
    async def markup(ctx: ss.StepContext) -> None:
        raise FileNotFoundError("[/var/data/in.csv]")

    engine.enable_schedules()

    async def populate() -> None:
        async with engine:
            handle = await engine.start("cli.markup", key="[bold]k[/bold]")
            with pytest.raises(ss.StepFailedError):
                await handle.result(timeout=DEADLINE)
            await engine.schedule("[/]", "cli.markup", every=3600)

    anyio.run(populate)
    listed = run(url, "ls", COLUMNS="200")
    assert listed.returncode == 0, listed.stderr
    assert "[/var/data/in.csv]" in listed.stdout
    assert "[bold]k[/bold]" in listed.stdout
    schedules = run(url, "schedules", "list")
    assert schedules.returncode == 0, schedules.stderr
    assert "[/]" in schedules.stdout
    shown = run(url, "schedules", "show", "[/]")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("[/]: cli.markup")


def test_worker_of_a_module_that_fails_at_import_says_so(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text('raise RuntimeError("boom at import")\n')
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    done = subprocess.run(
        [STEPSOURCE, "worker", "broken_app:engine"],
        env=env_for(url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "importing 'broken_app:engine' failed: RuntimeError: boom at import" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_empty_url_is_refused_not_taken_for_none(tmp_path: Path) -> None:
    done = subprocess.run(
        [STEPSOURCE, "ls", "--url", ""],
        env=env_for(f"sqlite:///{tmp_path / 'steps.db'}"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "--url is empty" in done.stderr
    assert not (tmp_path / "stepsource.db").exists()
