"""The command line as a new user meets it, through the real `stepsource` entry point in
subprocesses: `start`, `--version`, `ls` at 80 columns, prefixes of ids, refusals that say
what is wrong (a mistyped database path, --workers 0, --at past the end, cancelling an ended
execution, a missing driver's install hint), takeovers in `history`, help text.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import stepsource as ss
from stepsource.cli import main

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

import cli_app_v1  # noqa: E402

STEPSOURCE = str(Path(sys.executable).parent / "stepsource")
DEADLINE = 30.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.timeout(180)


def env_for(url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSOURCE_")}
    for name in ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "TERM"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    if url is not None:
        env["STEPSOURCE_URL"] = url
    env.update(extra)
    return env


def run(
    url: str | None, *args: str, cwd: Path | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STEPSOURCE, *args],
        env=env_for(url, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


async def arun(url: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`run` from inside an event loop that keeps running an in-process worker meanwhile."""
    done = await anyio.run_process([STEPSOURCE, *args], env=env_for(url, **extra), check=False)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


# -- starting from the command line ------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the subprocesses do not depend on the test's event loop


@pytest.mark.anyio
async def test_start_waits_for_the_result_of_a_step_a_worker_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    worker = cli_app_v1.engine.derive(url=url, workers=2, poll_interval=0.02)
    async with worker:  # publishes its steps: a client without the code can start them
        done = await arun(url, "start", "cli.order", '{"items": [2, 3]}', "--wait")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        execution_id = lines[0].split()[1]
        assert lines[0] == f"execution {execution_id} completed"
        assert json.loads(lines[-1]) == {"total": 5}
        assert (await worker.describe(execution_id)).status == "completed"

        started = await arun(url, "start", "cli.flaky", '{"n": 1}', "--json")
        assert started.returncode == 0, started.stderr
        flaky = json.loads(started.stdout)["execution_id"]
        handle = worker.get_handle(flaky)
        assert await handle.result(timeout=DEADLINE) == {"doubled": 2}

        bad = await arun(url, "start", "cli.order", '{"items": "none"}')
        assert bad.returncode == 2
        assert "input does not match" in bad.stderr
        unknown = await arun(url, "start", "cli.nothing", "{}")
        assert unknown.returncode == 2
        assert "nor published by any worker" in unknown.stderr
        not_object = await arun(url, "start", "cli.order", "[1]")
        assert not_object.returncode == 2
        assert "must be a JSON object" in not_object.stderr
    await worker.aclose()


def test_start_of_a_step_no_worker_runs_warns_and_the_wait_says_why(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    app = ("--app", "cli_app_v1:engine")  # registered here, so the input is validated locally
    done = run(url, "start", "cli.order", '{"items": [1]}', *app)
    assert done.returncode == 0, done.stderr
    assert "no worker has published step 'cli.order'" in done.stderr
    waited = run(url, "start", "cli.order", '{"items": [1]}', *app, "--wait", "--timeout", "0.3")
    assert waited.returncode == 1
    assert "did not finish within 0.3 seconds: no worker has published" in waited.stderr


# -- ls, prefixes, show, history, cancel -------------------------------------------------------
async def _populate(url: str) -> dict[str, str]:
    engine = cli_app_v1.engine.derive(url=url, workers=2, poll_interval=0.02)
    async with engine:
        order = await engine.start("cli.order", {"items": [1, 2]})
        flaky = await engine.start("cli.flaky", {"n": 3})
        for handle in (order, flaky):
            await handle.result(timeout=DEADLINE)
    await engine.aclose()
    return {"order": order.execution_id, "flaky": flaky.execution_id}


def test_ls_fits_80_columns_with_short_ids_and_coloured_statuses(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    ids = anyio.run(_populate, url)
    narrow = run(url, "ls", COLUMNS="80")
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), narrow.stdout
    for execution_id in ids.values():
        assert execution_id[:8] in narrow.stdout
        assert execution_id not in narrow.stdout
    assert "cli.order@1.0.0" in narrow.stdout
    assert "completed" in narrow.stdout
    coloured = run(url, "ls", COLUMNS="80", FORCE_COLOR="1")
    assert re.search(r"\x1b\[[0-9;]*32m\s*completed", coloured.stdout), coloured.stdout  # green
    assert ANSI.sub("", coloured.stdout) == narrow.stdout

    # every command taking an id accepts the short id ls shows
    short = ids["order"][:8]
    shown = run(url, "show", short, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["record"]["id"] == ids["order"]
    nothing = run(url, "show", "abcdef12")
    assert nothing.returncode == 2
    assert "no execution id starts with 'abcdef12'" in nothing.stderr
    too_short = run(url, "show", ids["order"][:2])
    assert too_short.returncode == 2
    assert f"{ids['order'][:2]!r} is too short to pick an execution" in too_short.stderr
    assert "at least 4 characters" in too_short.stderr

    # --at past the end is refused, not printed as if valid
    last = json.loads(shown.stdout)["record"]["version"]
    past = run(url, "show", ids["order"], "--at", "99")
    assert past.returncode == 2
    assert f"--at 99 is outside the execution's events (versions 1 to {last})" in past.stderr
    assert run(url, "show", ids["order"], "--at", str(last)).returncode == 0

    # cancelling an execution that ended says so plainly
    cancelled = run(url, "cancel", short)
    assert cancelled.returncode == 2
    assert "already ended (completed): there is nothing to cancel" in cancelled.stderr


class _Gate:
    """Holds the first run of the handler until its worker stops, as a lost worker would."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.hold = True


def _takeover_app(gate: _Gate) -> ss.Engine:
    engine = ss.Engine("memory://", workers=1, poll_interval=0.02, lease_seconds=30)

    @engine.step("fm.slow")
    async def slow(ctx: ss.StepContext) -> dict[str, bool]:
        await ctx.set_state("began", True)
        if gate.hold:
            gate.entered.set()
            await anyio.sleep_forever()
        return {"done": True}

    return engine


async def _taken_over(url: str) -> str:
    gate = _Gate()
    first = _takeover_app(gate).derive(url=url)
    first.worker_id = "worker-one"
    async with first:
        handle = await first.start("fm.slow")
        await gate.entered.wait()
    # the first worker stopped with the attempt running; the second one takes it over
    gate.hold = False
    second = _takeover_app(gate).derive(url=url)
    second.worker_id = "worker-two"
    async with second:
        assert await second.get_handle(handle.execution_id).result(timeout=DEADLINE)
    await first.aclose()
    await second.aclose()
    return handle.execution_id


def test_history_shows_takeovers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    execution_id = anyio.run(_taken_over, url)
    entries = json.loads(run(url, "history", execution_id, "--json").stdout)
    takeovers = [e for e in entries if e["type"] == "takeover"]
    assert len(takeovers) == 1
    assert takeovers[0]["details"] == {
        "attempt": 1,
        "worker_id": "worker-two",
        "previous_worker_id": "worker-one",
        "handed_over": True,  # the first worker stopped (gracefully): not a lost worker
    }
    # the first worker's state write was buffered (no side effect followed it), so the second
    # worker records it again after taking over
    assert [e["type"] for e in entries] == [
        "started",
        "takeover",
        "state-set",
        "completed",
    ]
    table = run(url, "history", execution_id)
    assert "takeover" in table.stdout


# -- refusals and details ---------------------------------------------------------------------
def test_read_only_commands_never_create_a_database_at_a_mistyped_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "stepsoruce.db"
    done = run(f"sqlite:///{typo}", "ls")  # the real entry point once
    assert done.returncode == 3, done.stderr
    assert f"cannot read {typo}: there is no such file" in done.stderr
    assert not typo.exists()
    # every other command that only reads, through the same main() in this process
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEPSOURCE_URL", raising=False)
    nobody = "00000000-0000-4000-8000-000000000000"
    for args in (
        ("show", nobody),
        ("history", nobody),
        ("events", nobody),
        ("verify", "--app", "cli_app_v1:engine"),
        ("tail", "--limit", "1"),
        ("cancel", nobody),
        ("export", "--to", f"sqlite:///{tmp_path / 'copy.db'}"),
        ("projections", "rebuild"),
    ):
        assert main(["--url", f"sqlite:///{typo}", *args]) == 3, args
        assert "there is no such file" in capsys.readouterr().err, args
        assert not typo.exists(), args
    # the default ./stepsource.db too
    assert main(["ls"]) == 3
    assert not (tmp_path / "stepsource.db").exists()


def test_a_port_in_use_is_a_usage_error_before_anything_claims_to_serve(tmp_path: Path) -> None:
    """``ui`` printed "stepsource ui on http://..." and then uvicorn's bind error; a worker's
    --metrics-port crashed with an OSError traceback. Both say which flag and why, exit 2."""
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    anyio.run(cli_app_v1.engine.derive(url=url, workers=0).start, "cli.order", {"items": [1]})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        ui = run(url, "ui", "--port", port, "--app", "cli_app_v1:engine")
        metrics = run(url, "worker", "cli_app_v1:engine", "--metrics-port", port)
    assert ui.returncode == 2
    assert ui.stderr.strip() == (
        f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use). "
        "Pick another port, or stop what listens there"
    )
    assert metrics.returncode == 2
    assert f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}" in metrics.stderr
    assert "Traceback" not in metrics.stderr
    # an address not of this machine: the host flag is at fault, and named
    elsewhere = run(url, "ui", "--host", "192.0.2.1", "--port", port, "--app", "cli_app_v1:engine")
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.startswith(
        f"error: --host 192.0.2.1: cannot listen on 192.0.2.1:{port}"
    )
    assert "Give --host an address of this machine" in elsewhere.stderr
    out_of_range = run(url, "ui", "--port", "70000")
    assert out_of_range.returncode == 2
    assert "70000 is not a port (0 to 65535)" in out_of_range.stderr


def test_usage_errors_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'steps.db'}"
    version = run(url, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"stepsource {ss.__version__}"

    zero = run(url, "worker", "cli_app_v1:engine", "--workers", "0")
    assert zero.returncode == 2
    assert "--workers 0: a worker must run at least one execution" in zero.stderr

    # a wrong attribute names the module's Engines (it said "found NoneType")
    typo = run(url, "worker", "cli_app_v1:engnie")
    assert typo.returncode == 2
    assert (
        "'cli_app_v1:engnie' is not a stepsource Engine (cli_app_v1 has no 'engnie'). "
        "The Engines in cli_app_v1: engine"
    ) in typo.stderr

    bad_url = run("mysql://db/steps", "ls")
    assert bad_url.returncode == 2
    for form in ("memory://", "sqlite:///", "nats://", "redis://", "postgresql://"):
        assert form in bad_url.stderr

    commands = ["start", "worker", "ls", "show", "history", "tail", "cancel", "demo", "verify"]
    for args in ([], *([name] for name in commands)):
        with pytest.raises(SystemExit) as exited:
            main([*args, "--help"])
        assert exited.value.code == 0
        shown = capsys.readouterr().out
        assert "usage: stepsource" in shown
        assert "``" not in shown, args
        assert "seed 0" not in shown, args


def test_install_hints_keep_their_extras(tmp_path: Path) -> None:
    # a Python where the NATS driver is not installed (a package named nats that fails)
    fake = tmp_path / "no_driver" / "nats"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'nats'\")\n")
    path = os.pathsep.join([str(fake.parent), str(TESTS_DIR)])
    done = run("nats://127.0.0.1:4222", "ls", PYTHONPATH=path)
    assert done.returncode == 2
    assert "pip install 'stepsource[nats]'" in done.stderr
