"""Security: no pickle, secrets redacted and never recorded, payload encryption at rest."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import stepsource as ss
from stepsource.testing.nats_server import NatsServer
from stepsource.testing.redis_server import RedisServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ["stepsource", "aggregates", "projections", "adapters", "engine"]
MARKER = "TOPSECRET-PLAINTEXT-4711"


def test_no_pickle_anywhere_in_the_package() -> None:
    forbidden = re.compile(r"\b(import\s+(c?pickle|shelve|dill|marshal)|(c?pickle|dill)\.)")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in PACKAGE_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert offenders == []


async def test_a_secret_is_redacted_everywhere_and_never_recorded(
    backend_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = ss.Secret(MARKER)
    assert MARKER not in repr(token)
    assert MARKER not in str(token)
    assert MARKER not in f"{token} {token!r} {token:>20}"
    assert token.reveal() == MARKER
    engine = ss.Engine(backend_url, poll_interval=0.01)
    engine.register_service("api", {"token": token})

    @engine.step("secret.use")
    async def use(ctx: ss.StepContext) -> str:
        secret = ctx.get_service("api")["token"]
        ctx.log("calling the API", token=secret)
        try:
            await ctx.set_state("token", secret)
        except ss.StateValueError as error:
            return str(error)
        return "recorded!"

    with caplog.at_level(logging.INFO, logger="stepsource.step"):
        async with engine:
            handle = await engine.start("secret.use")
            message = await handle.result(timeout=10)
    assert isinstance(message, str)
    assert "secrets are never recorded" in message
    assert MARKER not in message
    for record in caplog.records:
        assert MARKER not in record.getMessage()
        assert MARKER not in repr(record.__dict__)
    with pytest.raises(ss.StateValueError):
        await engine.start("secret.use", {"token": token})
    events = await engine.events(handle.execution_id)
    assert all(MARKER not in repr(vars(e)) for e in events)


def test_keygen_prints_a_key_the_cipher_accepts(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "stepsource", "keygen"],
        cwd=tmp_path,  # not the repo root, whose folders would shadow the installed package
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = run.stdout.strip()
    assert len(base64.b64decode(key)) == 32
    ss.Engine("memory://", cipher_key=key)  # accepted
    with pytest.raises(ss.UsageError, match="keygen"):
        ss.Engine("memory://", cipher_key="not-a-key")


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["sqlite", "nats", "redis"])
async def test_payloads_are_encrypted_at_rest_in_every_file(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    monkeypatch.setenv("STEPSOURCE_CIPHER_KEY", key)  # the environment variable switches it on
    with contextlib.ExitStack() as stack:
        if kind == "nats":
            server = stack.enter_context(NatsServer(tmp_path / "nats", sync_interval="always"))
            url = f"{server.url}?stream=SECRET"
        elif kind == "redis":  # its append-only file holds every write
            redis = stack.enter_context(RedisServer(tmp_path / "redis"))
            url = f"{redis.url}?prefix=SECRET"
        else:
            url = f"sqlite:///{tmp_path / 'secret.db'}"
        engine = ss.Engine(url, poll_interval=0.01, snapshot_every=2)

        @engine.step("private.fails")
        async def fails(ctx: ss.StepContext, note: str) -> None:
            raise ValueError(f"bad note {note}")  # an error message holding user data

        @engine.step("private")
        async def private(ctx: ss.StepContext, note: str) -> dict[str, Any]:
            await ctx.set_state("note", note)
            await ctx.create_checkpoint({"note": note})
            ctx.add_history_entry("custom", {"note": note})
            await ctx.set_global_state("shared", note, ttl=3600)
            received = await ctx.wait_for_event("go")  # an inbox payload
            await ctx.update_state({"again": note})
            return {"echo": note, "received": received}

        async with engine:
            handle = await engine.start("private", {"note": MARKER})
            with anyio.fail_after(20):
                while (await engine.describe(handle.execution_id)).status != "waiting":
                    await anyio.sleep(0.02)
            await handle.send_event("go", {"also": MARKER})
            result = await handle.result(timeout=20)
            assert result == {"echo": MARKER, "received": {"also": MARKER}}
            failing = await engine.start("private.fails", {"note": MARKER})
            with pytest.raises(ss.StepFailedError, match=MARKER):
                await failing.result(timeout=20)
            assert len(await engine.executions()) == 2  # the read model exists too
        assert (await engine.state_of(handle.execution_id))["note"] == MARKER
        await engine.aclose()
        if kind == "nats":
            server.stop()  # flush and close the store files before reading them
        if kind == "redis":
            redis.stop()
    written = files_under(tmp_path)
    assert written
    for path in written:
        assert MARKER.encode() not in path.read_bytes(), f"plaintext found in {path}"

    if kind != "sqlite":
        return  # the server is gone; reading without the key is checked on SQLite
    monkeypatch.delenv("STEPSOURCE_CIPHER_KEY")
    without_key = ss.Engine(url, workers=0)
    with pytest.raises(ss.UnknownEventError, match="cipher_key") as caught:
        await without_key.state_of(handle.execution_id)
    assert handle.execution_id in str(caught.value)
    wrong = ss.Engine(url, workers=0, cipher_key=base64.b64encode(b"x" * 32).decode())
    with pytest.raises(ss.UnknownEventError, match="another cipher key"):
        await wrong.history_of(handle.execution_id)
    await without_key.aclose()
    await wrong.aclose()


async def test_a_process_without_the_key_writes_nothing_into_an_encrypted_log(
    tmp_path: Path,
) -> None:
    """A keyless client's start was accepted and its input stored in clear beside the
    encrypted records (the workers with the key then set the execution aside, never run);
    its fold of the shared executions index showed every execution as quarantined."""
    url = f"sqlite:///{tmp_path / 'secret.db'}"
    key = base64.b64encode(b"k" * 32).decode()
    keyed = ss.Engine(url, poll_interval=0.01, cipher_key=key)

    @keyed.step("private")
    async def private(ctx: ss.StepContext, note: str) -> str:
        return str(await ctx.wait_for_event("go"))

    async with keyed:
        handle = await keyed.start("private", {"note": "x"})
        with anyio.fail_after(20):
            while (await keyed.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.02)
    end = await keyed.store.backend.max_position()

    keyless = ss.Engine(url, workers=0)
    keyless.step("private")(private)
    fix = "Pass cipher_key= to the Engine (or set STEPSOURCE_CIPHER_KEY)"
    with pytest.raises(ss.UsageError, match="the log is encrypted") as refused:
        await keyless.start("private", {"note": MARKER})
    assert fix in str(refused.value)
    with pytest.raises(ss.UsageError, match="the log is encrypted"):
        await keyless.get_handle(handle.execution_id).send_event("go", MARKER)
    with pytest.raises(ss.UsageError, match="the executions index would take"):
        await keyless.executions()
    keyless_worker = ss.Engine(url, workers=2)
    keyless_worker.step("private")(private)
    with pytest.raises(ss.UsageError, match="the log is encrypted"):
        async with keyless_worker:
            pass
    await keyless_worker.aclose()
    await keyless.aclose()
    assert await keyed.store.backend.max_position() == end  # nothing written
    assert not await keyed.store.backend.inbox(handle.execution_id)
    async with keyed:
        assert [row.status for row in await keyed.executions()] == ["waiting"]
        await handle.send_event("go", "yes")
        assert await handle.result(timeout=20) == "yes"
    await keyed.aclose()
    assert MARKER.encode() not in (tmp_path / "secret.db").read_bytes()


def test_every_broad_except_in_the_package_says_why() -> None:
    """No `except Exception` turns a bug into an error quietly: each one is a recorded
    outcome (a handler's, a sub-step's, an update's) and says so where it stands."""
    unexplained = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in PACKAGE_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "except Exception" in line and "# noqa: BLE001 - " not in line and "# why: " not in line
    ]
    assert unexplained == []
