"""The web UI in a real browser: Playwright drives Chromium against `stepsource ui` serving a
real SQLite log, in its own process, while this process writes to the same log.

`make test` provides the browser (tests/setup_browser.py records which one in .venv/.chromium).
`make screenshots` runs the page tour below with STEPSOURCE_SCREENSHOTS=docs/img.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import pytest
from playwright.sync_api import (
    Browser,
    BrowserType,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

import stepsource as ss
from stepsource.aggregates import events as ev

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # --import-mode=importlib does not add the tests directory
    sys.path.insert(0, str(TESTS_DIR))

from ui_app import INJECTION, make_engine  # noqa: E402

T = TypeVar("T")
RECORD = Path(__file__).resolve().parents[1] / ".venv" / ".chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """The Chromium tests/setup_browser.py chose (Playwright's own when it recorded none)."""
    chosen = os.environ.get("STEPSOURCE_CHROMIUM") or (
        RECORD.read_text().strip() if RECORD.exists() else shutil.which("chromium") or ""
    )
    return {**browser_type_launch_args, **({"executable_path": chosen} if chosen else {})}


# pytest-playwright keeps Playwright (whose sync API runs an event loop on the main thread)
# for the whole session; every later test that runs an event loop would then fail. These
# overrides scope Playwright and the browser to this module: both stop when it ends.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright) -> BrowserType:
    return playwright.chromium


@pytest.fixture(scope="module")
def browser(
    browser_type: BrowserType, browser_type_launch_args: dict[str, Any]
) -> Iterator[Browser]:
    launched = browser_type.launch(**browser_type_launch_args)
    yield launched
    launched.close()


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    return {"viewport": {"width": 1366, "height": 900}}


@pytest.fixture(scope="session")
def base_url() -> str | None:
    """Replaces pytest-base-url's fixture (a method fixture newer pytest warns about): the
    tests use absolute addresses."""
    return None


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run engine code to completion on a thread of its own (Playwright's sync API owns an
    event loop on this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn, *args).result()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    base: str
    ids: dict[str, str]


async def populate(url: str) -> dict[str, str]:
    engine = make_engine(url)
    async with engine:
        batch = await engine.start("ui.batch", {"items": [1, 2, 3]}, correlation_id="order-7")
        markup = await engine.start("ui.markup", {})
        flow = await engine.start("ui.flow", {"n": 1})
        approval = await engine.start("ui.approval", {})
        for handle in (batch, markup, flow):
            await handle.result(timeout=30)
        with anyio.fail_after(30):
            while (await engine.describe(approval.execution_id)).status != "waiting":
                await anyio.sleep(0.02)
    return {
        "batch": batch.execution_id,
        "markup": markup.execution_id,
        "flow": flow.execution_id,
        "approval": approval.execution_id,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("ui")
    url = f"sqlite:///{home / 'steps.db'}"
    ids = run(populate, url)
    port = free_port()
    log = (home / "ui.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "stepsource", "ui", "--url", url, "--port", str(port)],
        cwd=home,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((home / "ui.log").read_text()) from None
                time.sleep(0.1)
        yield Served(url, base, ids)
    finally:
        process.terminate()
        process.wait(15)
        log.close()


async def state_at(url: str, execution_id: str, version: int) -> dict[str, Any]:
    engine = ss.Engine(url, workers=0)
    try:
        return dict(await engine.state_of(execution_id, at_version=version))
    finally:
        await engine.aclose()


async def event_versions(url: str, execution_id: str, kind: type) -> list[int]:
    engine = ss.Engine(url, workers=0)
    try:
        events = await engine.events(execution_id)
    finally:
        await engine.aclose()
    return [e.originator_version for e in events if isinstance(e, kind)]


def shown_state(page: Page) -> dict[str, Any]:
    rows = page.locator("#state tr[data-key]")
    return {
        rows.nth(i).get_attribute("data-key") or "": orjson.loads(
            rows.nth(i).locator("pre.value").inner_text()
        )
        for i in range(rows.count())
    }


def test_list_shows_executions_and_leads_to_one(page: Page, served: Served) -> None:
    batch = served.ids["batch"]
    page.goto(served.base + "/")
    row = page.locator(f"tr[data-id='{batch}']")
    expect(row).to_contain_text("ui.batch")
    expect(row).to_contain_text("completed")
    expect(page.locator(".count[data-status='completed'] b")).to_have_text(
        "7"
    )  # with the flow's 4 nodes
    expect(page.locator(".count[data-status='waiting'] b")).to_have_text("1")
    expect(page.locator(".chart rect").first).to_be_visible()
    # filters: by correlation id only the batch is left
    page.goto(served.base + "/?correlation=order-7")
    expect(page.locator("tbody tr[data-id]")).to_have_count(1)
    row = page.locator(f"tr[data-id='{batch}']")
    row.get_by_role("link").click()
    expect(page.locator("#execution-id")).to_have_text(batch)
    expect(page.locator("h1")).to_contain_text("ui.batch")
    # the timeline: one attempt, each ctx.do its own nested block with its result event
    expect(page.locator(".attempt summary")).to_have_text(["scheduled", "attempt 1"])
    scoped = page.locator(".block.scoped")
    expect(scoped.locator(".scope")).to_have_text(["ctx.do add-0", "ctx.do add-1", "ctx.do add-2"])
    expect(scoped.first).to_contain_text("SubStepCompleted")


def test_scrubber_shows_the_state_at_each_version(page: Page, served: Served) -> None:
    batch = served.ids["batch"]
    updates = run(event_versions, served.url, batch, ev.StateUpdated)
    target = updates[1]  # the second update: "done" and "total" change from version - 1
    page.goto(f"{served.base}/e/{batch}/versions")
    slider = page.locator("#scrubber")
    last = int(slider.get_attribute("max") or "0")
    slider.focus()
    for _ in range(last - target):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#shown-version")).to_have_text(str(target))
    expect(page).to_have_url(f"{served.base}/e/{batch}/versions?v={target}")
    assert shown_state(page) == run(state_at, served.url, batch, target)
    expect(page.locator("#state tr[data-key='done']")).to_have_class("c-changed")
    expect(page.locator("#raw-event")).to_contain_text('"type": "StateUpdated"')
    # addressable as ?v=N: the first version has empty state, the checkpoint's version lists it
    checkpoint = run(event_versions, served.url, batch, ev.CheckpointCreated)[0]
    page.goto(f"{served.base}/e/{batch}/versions?v={checkpoint}")
    assert shown_state(page) == run(state_at, served.url, batch, checkpoint)
    expect(page.locator("#checkpoints li.c-added")).to_have_count(1)
    page.keyboard.press("ArrowRight")
    expect(page.locator("#shown-version")).to_have_text(str(checkpoint + 1))
    assert shown_state(page) == run(state_at, served.url, batch, checkpoint + 1)


async def start_one(url: str) -> str:
    engine = make_engine(url, workers=0)
    try:
        handle = await engine.start("ui.node", {"n": 41}, correlation_id="live")
    finally:
        await engine.aclose()
    return handle.execution_id


def test_list_updates_live_when_another_process_writes(page: Page, served: Served) -> None:
    page.goto(served.base + "/")
    expect(page.locator("tbody tr[data-id]").first).to_be_visible()
    page.evaluate("window.__same_page = true")
    execution_id = run(start_one, served.url)
    row = page.locator(f"tr[data-id='{execution_id}']")
    expect(row).to_contain_text("scheduled", timeout=10_000)
    assert page.evaluate("window.__same_page") is True  # no reload: the row came by SSE


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def first_event(url: str, timeout: float) -> str | None:
    """The name of the first event a server-sent-events stream sends within ``timeout``
    seconds of silence (its comments and retry line skipped); None if it sends none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            for line in response:
                if line.startswith(b"event: "):
                    return str(line[len(b"event: ") :].decode().strip())
    except TimeoutError:
        return None
    return None


def test_the_list_stream_reports_a_change_made_before_it_started(served: Served) -> None:
    """A page's live stream starts from what the page showed: an execution started between
    the page's rendering and the stream's start (a slow browser, a reconnection) is
    reported, not taken as the stream's starting point."""
    page = fetch(served.base + "/")
    live = page.split('data-live="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    execution_id = run(start_one, served.url)
    deadline = time.monotonic() + 30
    while execution_id not in fetch(served.base + "/?fragment=1"):  # the list shows it now
        assert time.monotonic() < deadline, "the new execution never reached the list"
        time.sleep(0.1)
    assert first_event(served.base + live, timeout=10) == "change"


async def finish(url: str, execution_id: str) -> Any:
    engine = make_engine(url)
    async with engine:
        return await engine.get_handle(execution_id).result(timeout=30)


def test_signal_sent_from_the_page_reaches_the_handler(page: Page, served: Served) -> None:
    approval = served.ids["approval"]
    page.goto(f"{served.base}/e/{approval}")
    form = page.locator("form[data-kind='signal']")
    form.locator("input[name='name']").fill("decide")
    form.locator("input[name='payload']").fill('{"approved": true, "by": "ana"}')
    form.get_by_role("button").click()
    expect(page.locator(".flash")).to_have_text("sent signal 'decide'")
    page.evaluate("window.__same_page = true")
    assert run(finish, served.url, approval) == {"decision": {"approved": True, "by": "ana"}}
    # the open page follows the execution: it shows the end without a reload
    expect(page.locator(".exec-head .status")).to_have_text("completed", timeout=10_000)
    expect(page.locator("#output")).to_contain_text('"approved": true')
    assert page.evaluate("window.__same_page") is True


async def status_after_running(url: str, execution_id: str) -> str:
    engine = make_engine(url)
    async with engine:
        with anyio.fail_after(30):
            while (status := (await engine.describe(execution_id)).status) not in (
                "completed",
                "cancelled",
            ):
                await anyio.sleep(0.02)
    return status


def test_cancel_asks_for_confirmation_first(page: Page, served: Served) -> None:
    execution_id = run(start_one, served.url)  # scheduled: no worker has run it yet
    page.goto(f"{served.base}/e/{execution_id}")
    button = page.locator("form[data-kind='cancel'] button")
    page.once("dialog", lambda dialog: dialog.dismiss())
    button.click()
    expect(page.locator(".flash")).to_have_count(0)
    assert page.url == f"{served.base}/e/{execution_id}"
    page.once("dialog", lambda dialog: dialog.accept())
    button.click()
    expect(page.locator(".flash")).to_have_text("asked the execution to cancel")
    assert run(status_after_running, served.url, execution_id) == "cancelled"


def test_markup_in_a_state_value_is_shown_as_text(page: Page, served: Served) -> None:
    markup = served.ids["markup"]
    for path in (f"/e/{markup}/versions", f"/e/{markup}"):
        page.goto(served.base + path)
        region = page.locator("#state" if "versions" in path else "#output")
        expect(region).to_contain_text("<script>window.__pwned = 1</script><img src=x")
        assert region.locator("script, img").count() == 0
        assert page.evaluate("window.__pwned") is None
    page.goto(f"{served.base}/e/{markup}/versions")
    assert shown_state(page) == {"html": INJECTION}


def test_every_page_renders_without_script_errors(
    page: Page, served: Served, tmp_path: Path
) -> None:
    """The page tour `make screenshots` saves; here every page must load with no script
    error and no Content-Security-Policy violation, in both themes."""
    target = Path(os.environ.get("STEPSOURCE_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.set_viewport_size({"width": 1366, "height": 900})
    ids = served.ids
    tour = {
        "executions": "/",
        "execution": f"/e/{ids['batch']}",
        "execution-waits": f"/e/{ids['approval']}",
        "versions": f"/e/{ids['batch']}/versions?v=9",
        "flow": f"/e/{ids['flow']}/flow",
    }
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        for name, path in tour.items():
            page.goto(served.base + path)
            expect(page.locator("main h1").first).to_be_visible()
            page.screenshot(path=str(target / f"ui-{name}-{scheme}.png"), full_page=True)
    page.goto(f"{served.base}/e/{ids['flow']}/flow")
    nodes = page.locator("svg a.node")
    expect(nodes).to_have_count(5)  # the flow and its four nodes, each linked to its execution
    for i in range(5):
        assert (nodes.nth(i).get_attribute("href") or "").startswith("/e/")
    expect(page.locator("svg path.edge")).to_have_count(5)
    assert problems == []
