"""The web UI over HTTP against clumsy and hostile clients: every malformed parameter or form
is a 4xx that names it (never a 500, a silent default, or an action applied), a mounted UI
hands its token over under its own prefix, other cookies on the host do not hide the UI's,
credentials in the backend URL never reach a page, and a loopback server without a token
answers only loopback host names (DNS rebinding)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import stepsource as ss
from stepsource.ui_cli import LOOPBACK_HOSTS

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

from ui_app import make_engine  # noqa: E402


async def _executions(url: str) -> tuple[str, str]:
    """A waiting execution (its signals are recorded) and a completed one of 9+ events."""
    engine = make_engine(url)
    async with engine:
        waiting = await engine.start("ui.approval", {})
        done = await engine.start("ui.batch", {"items": [1, 2, 3]})
        await done.result()
        with anyio.fail_after(30):
            while (await engine.describe(waiting.execution_id)).status != "waiting":
                await anyio.sleep(0.02)
    return waiting.execution_id, done.execution_id


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ui-input') / 'steps.db'}"
    return (url, *anyio.run(_executions, url))


def client(url: str, **options: Any) -> TestClient:
    app = ss.Engine(url, workers=0).ui_app(**options)
    return TestClient(app, follow_redirects=False)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


def signals_of(url: str, execution_id: str) -> list[str]:
    async def read() -> list[str]:
        engine = ss.Engine(url, workers=0)
        try:
            events = await engine.events(execution_id)
        finally:
            await engine.aclose()
        return [e.signal for e in events if type(e).__name__ == "SignalReceived"]  # type: ignore[attr-defined]

    return anyio.run(read)


@pytest.mark.parametrize(
    "path",
    [
        "/?page=99999999999999999999",
        "/?page=abc",
        "/?page=0",
        "/live?status=bogus",
        "/live?since=nope",
        "/live?page=99999999999999999999",
        "/e/{done}?page=-1",
        "/e/{done}?page=1e3",
        "/e/{done}/versions?v=abc",
        "/e/{done}/versions?v=0",
        "/e/{done}/versions?v=3.5",
        "/e/{done}/live?v=-5",
    ],
)
def test_a_malformed_parameter_is_a_400_naming_it(log: tuple[str, str, str], path: str) -> None:
    url, _, done = log
    with client(url) as http:
        answer = http.get(path.format(done=done))
        assert answer.status_code == 400, answer.text[:300]
        name = re.search(r"[?&](\w+)=", path)
        assert name is not None
        assert name.group(1) in answer.text  # the page names the parameter
        assert http.get("/").status_code == 200  # and the server goes on serving


def test_empty_or_absent_parameters_keep_their_defaults(log: tuple[str, str, str]) -> None:
    url, _, done = log
    with client(url) as http:
        for path in ("/?page=", f"/e/{done}?page=", f"/e/{done}/versions?v=", "/?page=2"):
            assert http.get(path).status_code == 200, path
        # an empty parameter is the default: the same page as without it
        assert http.get(f"/e/{done}/versions?v=").text == http.get(f"/e/{done}/versions").text
        assert http.get(f"/e/{done}?page=").text == http.get(f"/e/{done}").text
        assert http.get(f"/e/{done}/versions?v=").text != http.get(f"/e/{done}/versions?v=1").text


def test_the_live_stream_of_an_unknown_execution_is_a_404(log: tuple[str, str, str]) -> None:
    url, _, _ = log
    with client(url) as http:
        for execution_id in ("nope", "00000000-0000-0000-0000-000000000000"):
            assert http.get(f"/e/{execution_id}/live").status_code == 404


def test_actions_refuse_malformed_forms_and_apply_nothing(log: tuple[str, str, str]) -> None:
    url, waiting, _ = log
    before = signals_of(url, waiting)
    with client(url, read_only=False) as http:
        token = csrf_of(http.get(f"/e/{waiting}").text)

        def post(action: str, **fields: Any) -> str:
            files = fields.pop("files", None)
            sent = http.post(
                f"/e/{waiting}/{action}", data={"csrf_token": token, **fields}, files=files
            )
            assert sent.status_code == 303, sent.text
            return str(sent.headers["location"])

        too_long = post("signal", name="decide", payload=str(2**70))
        assert "refused" in too_long
        assert "beyond+64+bits" in too_long
        as_file = post("signal", payload="1", files={"name": ("n.txt", b"decide")})
        assert "must+be+text" in as_file
        assert "UTF-8" in post("signal", name="\ufffd", payload="1")
        assert "not+JSON" in post("signal", name="decide", payload="NaN")
        for version in ("\u00b2", "\u0663", "99999999999999999999999"):
            assert "refused" in post("fork", version=version)
        unknown = http.post(f"/e/{waiting}/bogus", data={"csrf_token": token, "payload": "{"})
        assert unknown.status_code == 404
    assert signals_of(url, waiting) == before


def test_a_mounted_ui_hands_its_token_over_under_its_prefix(log: tuple[str, str, str]) -> None:
    url, _, done = log
    ui = ss.Engine(url, workers=0).ui_app(token="T0k")
    service = Starlette(routes=[Mount("/debug/steps", app=ui)])
    with TestClient(service, follow_redirects=False) as http:
        handed = http.get(f"/debug/steps/e/{done}?token=T0k&page=1")
        assert handed.status_code == 303
        assert handed.headers["location"] == f"/debug/steps/e/{done}?page=1"
        assert http.get(handed.headers["location"]).status_code == 200  # with the cookie


def test_other_cookies_on_the_host_do_not_hide_the_token(log: tuple[str, str, str]) -> None:
    url, _, _ = log
    with client(url, token="T0k") as http:
        for header in (
            'prefs={"theme":"dark"}; stepsource_ui_token=T0k',
            "msg=hello world; stepsource_ui_token=T0k",
            "stepsource_ui_token=T0k; other=1",
        ):
            assert http.get("/", headers={"cookie": header}).status_code == 200, header
        assert http.get("/", headers={"cookie": "stepsource_ui_token=nope"}).status_code == 401


def test_pages_never_show_the_backend_password(tmp_path: Path) -> None:
    app = ss.Engine("postgresql://app:hunter2@127.0.0.1:1/db", workers=0).ui_app()
    with TestClient(app) as http:
        for path in ("/e/not-an-id", "/?status=bogus"):
            page = http.get(path)
            assert page.status_code in (400, 404)
            assert "hunter2" not in page.text
            assert "app:***@127.0.0.1" in page.text


def test_allowed_hosts_refuse_a_rebound_name(log: tuple[str, str, str]) -> None:
    url, waiting, _ = log
    app = ss.Engine(url, workers=0).ui_app(read_only=False, allowed_hosts=LOOPBACK_HOSTS)
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False) as http:
        assert http.get(f"/e/{waiting}").status_code == 200
        assert http.get("/", headers={"host": "localhost:8000"}).status_code == 200
        assert http.get("/", headers={"host": "[::1]:8000"}).status_code == 200
        rebound = http.get(f"/e/{waiting}", headers={"host": "attacker.example:8000"})
        assert rebound.status_code == 400
        assert "csrf_token" not in rebound.text


def test_the_flow_graph_draws_every_declared_node_and_dependency(tmp_path: Path) -> None:
    """The graph read each node's upstreams from what it was started with, which holds the
    completed ones only: a node after an optional node that failed was drawn beside it, with
    no edge from it; a node that never started (its required upstream failed) was missing."""
    url = f"sqlite:///{tmp_path / 'flows.db'}"
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("g.ok")
    async def ok(ctx: ss.StepContext) -> int:
        return 1

    @engine.step("g.bad")
    async def bad(ctx: ss.StepContext) -> int:
        raise ValueError("no")

    engine.dag(
        "g.optional",
        {
            "a": ss.Node("g.ok"),
            "bad": ss.Node("g.bad", depends_on=["a"], optional=True),
            "d": ss.Node("g.ok", depends_on=["a", "bad"]),
        },
    )
    engine.dag(
        "g.required",
        {
            "a": ss.Node("g.ok"),
            "bad": ss.Node("g.bad"),
            "after": ss.Node("g.ok", depends_on=["bad"]),
        },
    )

    async def run() -> tuple[str, str]:
        async with engine:
            optional = await engine.start("g.optional")
            await optional.result(timeout=30)
            required = await engine.start("g.required")
            with pytest.raises(ss.StepFailedError):
                await required.result(timeout=30)
            return optional.execution_id, required.execution_id

    optional_id, required_id = anyio.run(run)

    def columns(page: str) -> dict[str, float]:
        found = re.findall(r'data-node="([^"]+)">\s*<rect x="([0-9.]+)"', page)
        return {key: float(x) for key, x in found}

    with TestClient(ss.Engine(url, workers=0).ui_app()) as http:
        page = http.get(f"/e/{optional_id}/flow").text
        x = columns(page)
        assert x["a"] < x["bad"] < x["d"]  # d waits for bad: a column after it
        assert page.count('class="edge"') == 4  # the flow->a, a->bad, a->d and bad->d
        page = http.get(f"/e/{required_id}/flow").text
        x = columns(page)
        assert set(x) >= {"a", "bad", "after"}
        assert x["bad"] < x["after"]
        assert '<g class="node s-not-started" data-node="after">' in page
        assert "/e/None" not in page


def test_a_business_key_finds_its_executions_and_a_chain_links_its_runs(tmp_path: Path) -> None:
    """The search box took execution ids only (a business key matched nothing), and a run
    that continued as new showed no link to the next run or the one before."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    engine = ss.Engine(url, poll_interval=0.01)

    @engine.step("k.loop")
    async def loop(ctx: ss.StepContext, n: int = 0) -> int:
        if n < 1:
            await ctx.continue_as_new({"n": n + 1})
        return n

    async def run() -> tuple[str, str]:
        async with engine:
            first = await engine.start("k.loop", {}, key="order-77")
            await first.result(timeout=30)
            await engine.start("k.loop", {"n": 5})  # another, without the key
            record = await engine.describe(first.execution_id)
            assert record.continued_as is not None
            return first.execution_id, record.continued_as

    first, second = anyio.run(run)
    with TestClient(ss.Engine(url, workers=0).ui_app()) as http:
        found = http.get("/", params={"q": "order-77"}).text
        assert first[:8] in found
        assert second[:8] in found  # the run it continued as keeps the key
        assert "No executions match" not in found
        # the other filters hold for a key's executions too
        later = http.get("/", params={"q": "order-77", "since": "2999-01-01T00:00"}).text
        assert first[:8] not in later
        elsewhere = http.get("/", params={"q": "order-77", "flow": "some.flow"}).text
        assert first[:8] not in elsewhere
        page = http.get(f"/e/{first}").text
        assert "continued as" in page
        assert f'href="/e/{second}"' in page
        assert f'href="/e/{first}"' in http.get(f"/e/{second}").text


def test_a_damaged_execution_and_an_unknown_address_say_so_in_the_ui(tmp_path: Path) -> None:
    """A damaged log answered 400 (the request's fault) and an unreadable event 404 (no such
    execution); an address with no page got the framework's bare "Not Found"."""
    path = tmp_path / "damaged.db"
    engine = ss.Engine(f"sqlite:///{path}", poll_interval=0.01)

    @engine.step("d.one")
    async def one(ctx: ss.StepContext) -> int:
        await ctx.set_state("k", "value")
        return 1

    async def run() -> str:
        async with engine:
            handle = await engine.start("d.one")
            await handle.result(timeout=30)
            return handle.execution_id

    execution_id = anyio.run(run)
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE events SET data = replace(data, 'value', 'VALUE') "
            "WHERE stream_id = ? AND topic = 'stepsource:StateSet'",
            (execution_id,),
        )
    with TestClient(ss.Engine(f"sqlite:///{path}", workers=0).ui_app()) as http:
        damaged = http.get(f"/e/{execution_id}")
        assert damaged.status_code == 500
        assert "stepsource check` lists the damage" in damaged.text
        nowhere = http.get("/no/such/page")
        assert nowhere.status_code == 404
        assert "there is no such page here" in nowhere.text
        assert 'class="flash"' not in nowhere.text
