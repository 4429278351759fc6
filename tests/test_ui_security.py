"""The web UI's guards, over HTTP: read-only by default when mounted, CSRF on every action,
an access token beyond loopback, escaping, and the headers that forbid inline scripts."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import stepsource as ss

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

from ui_app import make_engine  # noqa: E402


async def waiting_execution(url: str) -> str:
    engine = make_engine(url)
    async with engine:
        handle = await engine.start("ui.approval", {})
        with anyio.fail_after(30):
            while (await engine.describe(handle.execution_id)).status != "waiting":
                await anyio.sleep(0.02)
    return handle.execution_id


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ui') / 'steps.db'}"
    return url, anyio.run(waiting_execution, url)


def client(url: str, **options: object) -> TestClient:
    app = ss.Engine(url, workers=0).ui_app(**options)  # type: ignore[arg-type]
    return TestClient(app, follow_redirects=False)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


def test_ui_app_is_read_only_unless_the_service_opts_in(log: tuple[str, str]) -> None:
    url, execution_id = log
    with client(url) as http:
        page = http.get(f"/e/{execution_id}")
        assert page.status_code == 200
        assert '<form method="post"' not in page.text
        assert "read-only" in page.text
        refused = http.post(f"/e/{execution_id}/cancel", data={"csrf_token": "x"})
        assert refused.status_code == 403
    with client(url, read_only=False) as http:
        assert '<form method="post"' in http.get(f"/e/{execution_id}").text


def test_actions_need_the_pages_csrf_token(log: tuple[str, str]) -> None:
    url, execution_id = log
    with client(url, read_only=False) as http:
        token = csrf_of(http.get(f"/e/{execution_id}").text)
        for data in ({}, {"csrf_token": "forged"}):
            sent = http.post(f"/e/{execution_id}/signal", data={"name": "n", **data})
            assert sent.status_code == 403
        before = http.get(f"/e/{execution_id}/versions").text
        ok = http.post(
            f"/e/{execution_id}/event", data={"name": "n", "payload": "1", "csrf_token": token}
        )
        assert ok.status_code == 303
        assert "sent+event" in ok.headers["location"]
        bad = http.post(
            f"/e/{execution_id}/signal", data={"name": "n", "payload": "{", "csrf_token": token}
        )
        assert "not+JSON" in bad.headers["location"]
        assert http.get(f"/e/{execution_id}/versions").text == before  # the inbox, not the log
        # the result shows on the page it redirects to; a crafted ?msg= shows nothing (any
        # link put its own text in the status banner, as if an action had said it)
        shown = http.get(ok.headers["location"]).text
        assert '<p class="flash" role="status">sent event' in shown
        crafted = http.get(f"/e/{execution_id}", params={"msg": "verified: all is well"})
        assert 'class="flash"' not in crafted.text
        forged = ok.headers["location"].replace("sent+event", "verified")
        assert 'class="flash"' not in http.get(forged).text


def test_access_token_by_query_then_cookie_or_bearer(log: tuple[str, str]) -> None:
    url, _ = log
    with client(url, token="s3cret-token") as http:
        assert http.get("/").status_code == 401
        assert http.get("/static/app.js").status_code == 401
        assert http.get("/?token=wrong").status_code == 401
        handed = http.get("/?token=s3cret-token&status=waiting")
        assert handed.status_code == 303
        assert handed.headers["location"] == "/?status=waiting"  # the token leaves the address
        assert "HttpOnly" in handed.headers["set-cookie"]
        assert http.get("/?status=waiting").status_code == 200  # the cookie now
    with client(url, token="s3cret-token") as http:
        bearer = http.get("/", headers={"authorization": "Bearer s3cret-token"})
        assert bearer.status_code == 200


def test_pages_escape_values_and_forbid_inline_scripts(log: tuple[str, str]) -> None:
    url, execution_id = log
    with client(url) as http:
        missing = http.get("/", params={"q": "<script>alert(1)</script>", "step": "<b>x</b>"})
        assert "<script>alert(1)</script>" not in missing.text
        assert "&lt;b&gt;x&lt;/b&gt;" in missing.text
        page = http.get(f"/e/{execution_id}")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert page.headers["x-frame-options"] == "DENY"
        scripts = re.findall(r"<script[^>]*>", page.text)
        assert scripts
        assert all("src=" in tag for tag in scripts)
        assert http.get("/e/not-an-id").status_code in (400, 404)


def test_mounted_in_a_service_links_stay_under_its_prefix(log: tuple[str, str]) -> None:
    url, execution_id = log
    service = Starlette(routes=[Mount("/debug", app=ss.Engine(url, workers=0).ui_app())])
    with TestClient(service) as http:
        page = http.get("/debug/")
        assert page.status_code == 200
        assert f'href="/debug/e/{execution_id}"' in page.text
        assert 'href="/debug/static/app.css"' in page.text
        assert http.get("/debug/static/app.css").status_code == 200
    # with a token, its cookie is the UI's alone: it went to every route of the service
    guarded = ss.Engine(url, workers=0).ui_app(token="t0ken-for-debug")
    service = Starlette(routes=[Mount("/debug", app=guarded)])
    with TestClient(service) as http:
        handed = http.get("/debug/?token=t0ken-for-debug", follow_redirects=False)
        assert handed.status_code == 303
        assert "Path=/debug;" in handed.headers["set-cookie"] + ";"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served_beyond_loopback(log: tuple[str, str], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    url, _ = log
    port = free_port()
    out = tmp_path / "ui.log"
    command = [sys.executable, "-m", "stepsource", "ui", "--url", url]
    with out.open("w") as stream:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.2", "--port", str(port)],
            cwd=tmp_path,
            stdout=stream,
            stderr=stream,
        )
        try:
            yield f"http://127.0.0.2:{port}", out
        finally:
            process.terminate()
            process.wait(15)


def test_cli_beyond_loopback_generates_and_prints_a_token(
    served_beyond_loopback: tuple[str, Path],
) -> None:
    base, out = served_beyond_loopback
    deadline = time.monotonic() + 30
    while True:
        try:
            first = httpx.get(base + "/", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
    assert first.status_code == 401
    tokens = re.findall(r"\?token=(\S+)", out.read_text())
    assert len(tokens) == 1, out.read_text()
    handed = httpx.get(f"{base}/?token={tokens[0]}", timeout=5)
    assert handed.status_code == 303
    assert httpx.get(base + "/", cookies=handed.cookies, timeout=5).status_code == 200
