"""``stepsource ui`` and ``engine.ui_app()``: a web time-travel debugger over the log.

A Starlette application rendered on the server with Jinja2 (autoescape on: every value from
the log is text, never markup), one small script and one style sheet of its own, and SVG
pictures drawn by the templates. Live pages follow the log with server-sent events: the
server polls the engine's queries and tells the page when what it shows changed; the page
then fetches the changed fragment. Everything is read through the Engine's public queries;
the actions (signal, send event, update, cancel) go through execution handles, like any
client's, and exist only when the app is not read-only. Guards: ``security.Guard``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stepsource.engine.store import MAX_VERSION
from stepsource.engine.ui import views
from stepsource.engine.ui.render import as_json, ms_time, when
from stepsource.engine.ui.security import Guard, same_token
from stepsource.engine.ui.views import ServedEngine
from stepsource.errors import (
    CorruptLogError,
    StepsourceError,
    UnknownEventError,
    UnknownExecutionError,
    UsageError,
    mask_credentials,
)

__all__ = ["create_app"]

HERE = Path(__file__).parent
#: how often a live page's stream asks the engine whether what the page shows changed
POLL_SECONDS = 0.5
#: a comment line this often keeps proxies from closing an idle stream
KEEPALIVE_SECONDS = 15.0
#: how long the update action waits for the handler's answer before saying it is pending
UPDATE_WAIT_SECONDS = 5.0
#: the largest page number of a list (its offset stays a 64-bit integer with room to spare)
MAX_PAGE = 10**12
ACTIONS = ("signal", "event", "update", "cancel", "fork")


def whole_number(
    request: Request, name: str, *, low: int = 1, high: int = MAX_VERSION
) -> int | None:
    """The query parameter ``name`` as a whole number from ``low`` to ``high``; None when it
    is absent or empty; a UsageError (a 400 page) for anything else."""
    raw = request.query_params.get(name)
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise UsageError(
            f"{name}={raw[:40]!r} is not a whole number from {low} to {high:,}",
            hint=f"Leave {name} out for the default",
        )
    return int(raw)


def form_text(form: FormData, name: str) -> str:
    """The form field ``name`` as text ("" when absent); a UsageError for a file or for
    bytes that were not UTF-8 (the form parser turns those into U+FFFD)."""
    value = form.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"the form field {name!r} must be text, not a file")
    if "\ufffd" in value:
        raise UsageError(f"the form field {name!r} is not valid UTF-8 text")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def payload_of(text: str) -> Any:
    """A form's payload as JSON (empty: null); a UsageError when it is not JSON. Integers
    are read exactly, however long (the standard parser: orjson would read one past 64 bits
    as a float), so that one too large to record is refused by the handle, as through the
    API."""
    try:
        return json.loads(text or "null", parse_constant=_refuse_constant)
    except ValueError as error:  # json.JSONDecodeError is one, and so is a constant
        raise UsageError(
            f"the payload is not JSON: {error}", hint='Write it as JSON: 5, "text", {"k": 1}'
        ) from None


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["ms"] = ms_time
    env.filters["json"] = as_json
    env.filters["short"] = lambda text, n=80: text if len(text) <= n else text[: n - 1] + "…"
    return env


class UI:
    """The routes, around one engine. ``read_only`` drops the actions; ``csrf`` is the token
    every form posts back (one per app, embedded in its pages)."""

    def __init__(self, engine: ServedEngine, *, read_only: bool, poll: float) -> None:
        self.engine = engine
        self.read_only = read_only
        self.poll = poll
        self.csrf = secrets.token_urlsafe(24)
        #: signs the result messages an action redirects with (``?msg=...&sig=...``): a page
        #: shows only messages this app wrote, never a crafted link's text
        self._flash_key = secrets.token_bytes(32)
        self.env = _environment()

    def flash(self, message: str, execution_id: str) -> str:
        """The query string that shows ``message`` on the page of ``execution_id`` (the
        signature binds the two: a result cannot be shown on another execution's page)."""
        return urlencode({"msg": message, "sig": self._signature(message, execution_id)})

    def _signature(self, message: str, execution_id: str) -> str:
        signed = f"{execution_id}\n{message}".encode()
        return hmac.new(self._flash_key, signed, hashlib.sha256).hexdigest()[:32]

    def _message(self, request: Request) -> str | None:
        message = request.query_params.get("msg")
        execution_id = str(request.path_params.get("id", ""))
        if message is None or not same_token(
            request.query_params.get("sig"), self._signature(message, execution_id)
        ):
            return None
        return message

    # -- rendering --------------------------------------------------------------------------
    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        html = self.env.get_template(template).render(
            base=request.scope.get("root_path", ""),
            read_only=self.read_only,
            csrf=self.csrf,
            message=self._message(request),
            url=mask_credentials(self.engine.url or ""),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def error(self, request: Request, error: StepsourceError) -> Response:
        if isinstance(error, CorruptLogError | UnknownEventError):
            status = 500  # the store, not the request: a damaged or unreadable log
        elif isinstance(error, UnknownExecutionError | LookupError):
            status = 404
        else:
            status = 400
        return self.page(request, "error.html", status=status, error=str(error))

    async def not_found(self, request: Request, _: Exception) -> Response:
        """An address the UI has no page for, in the UI's own dress."""
        return self.page(request, "error.html", status=404, error="there is no such page here")

    # -- the executions list ----------------------------------------------------------------
    def filters(self, request: Request) -> views.ListFilters:
        q = request.query_params
        since = None
        if q.get("since"):
            try:
                since = datetime.fromisoformat(q["since"])
            except ValueError:
                raise UsageError(f"since {q['since']!r} is not an ISO 8601 time") from None
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
        status = q.get("status") or None
        if status is not None and status not in views.STATUSES:
            raise UsageError(f"unknown status {status!r}", hint=f"One of {views.STATUSES}")
        page = whole_number(request, "page", high=MAX_PAGE) or 1
        return views.ListFilters(
            status=status,
            step=q.get("step") or None,
            flow=q.get("flow") or None,
            correlation=q.get("correlation") or None,
            search=q.get("q") or None,
            since=since,
            page=page,
        )

    async def index(self, request: Request) -> Response:
        try:
            filters = self.filters(request)
            search = (filters.search or "").strip()
            if len(search) == 36:  # a whole execution id: go to it
                await self.engine.describe(search)
                return RedirectResponse(f"{request.scope.get('root_path', '')}/e/{search}", 303)
            view = await views.list_page(self.engine, filters)
        except StepsourceError as error:
            return self.error(request, error)
        template = "list_rows.html" if request.query_params.get("fragment") else "list.html"
        return self.page(request, template, view=view, statuses=views.STATUSES)

    async def list_live(self, request: Request) -> Response:
        try:
            filters = self.filters(request)
        except StepsourceError as error:
            return self.error(request, error)

        async def fingerprint() -> str:
            return (await views.list_page(self.engine, filters)).fingerprint

        # what the page showed (its fingerprint, ``seen``): a change between the page's
        # rendering and this stream's start (or a reconnection) is reported, not taken as
        # the starting point
        return self.stream(fingerprint, initial=request.query_params.get("seen"))

    # -- one execution ----------------------------------------------------------------------
    async def execution(self, request: Request) -> Response:
        execution_id = request.path_params["id"]
        try:
            page = whole_number(request, "page") or 1
            view = await views.execution_page(self.engine, execution_id, page)
        except StepsourceError as error:
            return self.error(request, error)
        template = (
            "execution_live.html" if request.query_params.get("fragment") else "execution.html"
        )
        verifiable = view.record.step_id in self.engine.step_ids()  # the code is served here
        return self.page(request, template, view=view, record=view.record, verifiable=verifiable)

    async def execution_live(self, request: Request) -> Response:
        execution_id = request.path_params["id"]
        try:
            seen = whole_number(request, "v", low=0) or 0
            await self.engine.describe(execution_id)  # an unknown one is a 404, not a stream
        except StepsourceError as error:
            return self.error(request, error)

        async def fingerprint() -> str:
            nonlocal seen
            newer = await self.engine.events(execution_id, from_version=seen + 1)
            if newer:
                seen = newer[-1].originator_version
            return str(seen)

        return self.stream(fingerprint, initial=str(seen))

    async def versions(self, request: Request) -> Response:
        execution_id = request.path_params["id"]
        try:
            version = whole_number(request, "v")
            view = await views.scrub_page(self.engine, execution_id, version)
        except StepsourceError as error:
            return self.error(request, error)
        template = "scrub_panel.html" if request.query_params.get("fragment") else "scrub.html"
        return self.page(request, template, view=view, record=view.record)

    async def flow(self, request: Request) -> Response:
        try:
            view = await views.flow_page(self.engine, request.path_params["id"])
        except StepsourceError as error:
            return self.error(request, error)
        return self.page(request, "flow.html", view=view, record=view.record)

    async def verify(self, request: Request) -> Response:
        """Replay the execution against the served engine's handler code (read-only)."""
        execution_id = request.path_params["id"]
        base = request.scope.get("root_path", "")
        try:
            divergence = await self.engine.verify(execution_id)
        except StepsourceError as error:
            message = f"not verified: {error}"
        else:
            message = (
                "verified: the handler code replays the record exactly"
                if divergence is None
                else f"divergence: {divergence}"
            )
        query = self.flash(message, execution_id)
        return RedirectResponse(f"{base}/e/{execution_id}?{query}", status_code=303)

    # -- actions ----------------------------------------------------------------------------
    async def action(self, request: Request) -> Response:
        if self.read_only:
            return Response("this stepsource UI is read-only\n", 403, media_type="text/plain")
        async with request.form() as form:  # closed after: an uploaded part is a temp file
            return await self.act(request, form)

    async def act(self, request: Request, form: FormData) -> Response:
        """The action of a POST, its form read."""
        execution_id = request.path_params["id"]
        kind = request.path_params["action"]
        token = form.get("csrf_token")
        if not same_token(token if isinstance(token, str) else None, self.csrf):
            return Response("missing or wrong CSRF token\n", 403, media_type="text/plain")
        if kind not in ACTIONS:
            return Response("unknown action\n", 404, media_type="text/plain")
        base = request.scope.get("root_path", "")
        try:
            name = form_text(form, "name")
            handle = self.engine.get_handle(execution_id)
            await self.engine.describe(execution_id)
            payload = payload_of(form_text(form, "payload"))
            if kind == "signal":
                await handle.signal(name, payload)
                message = f"sent signal {name!r}"
            elif kind == "event":
                await handle.send_event(name, payload)
                message = f"sent event {name!r}"
            elif kind == "update":
                args = payload if isinstance(payload, list) else [payload]
                try:
                    result = await handle.update(name, *args, timeout=UPDATE_WAIT_SECONDS)
                    message = f"update {name!r} returned {as_json(result, indent=False)}"
                except TimeoutError:
                    message = f"update {name!r} accepted; its answer is not in yet"
            elif kind == "cancel":
                await handle.cancel(form_text(form, "reason") or "cancelled from the web UI")
                message = "asked the execution to cancel"
            else:  # fork
                version = form_text(form, "version").strip()
                if not (version.isascii() and version.isdigit()):
                    raise UsageError(f"a version to fork from is a number, not {version[:40]!r}")
                forked = await self.engine.fork(execution_id, int(version))
                query = self.flash(
                    f"forked from {execution_id} at version {version}", forked.execution_id
                )
                return RedirectResponse(f"{base}/e/{forked.execution_id}?{query}", status_code=303)
        except StepsourceError as error:
            message = f"refused: {error}"
        query = self.flash(message, execution_id)
        return RedirectResponse(f"{base}/e/{execution_id}?{query}", status_code=303)

    # -- live updates -----------------------------------------------------------------------
    def stream(
        self, fingerprint: Callable[[], Awaitable[str]], initial: str | None = None
    ) -> Response:
        """Server-sent events: ``change`` whenever ``fingerprint()`` differs from what the
        page showed (``initial``, else the first answer)."""
        poll = self.poll

        async def events() -> AsyncIterator[str]:
            last = initial
            quiet = 0.0
            yield "retry: 2000\n\n"
            while True:
                try:
                    current = await fingerprint()
                except StepsourceError:
                    current = last or ""
                if last is not None and current != last:
                    yield f"event: change\ndata: {orjson.dumps(current).decode()}\n\n"
                    quiet = 0.0
                elif quiet >= KEEPALIVE_SECONDS:
                    yield ": keepalive\n\n"
                    quiet = 0.0
                last = current
                await anyio.sleep(poll)
                quiet += poll

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )


def create_app(
    engine: ServedEngine,
    *,
    read_only: bool = True,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> Guard:
    """The UI as an ASGI application over ``engine`` (see the module docstring).
    ``allowed_hosts``: the names a request's Host header may give (anything else is a
    400, which keeps a DNS-rebinding page from reading or acting through a browser on this
    machine); None for any (a service mounting the UI checks hosts itself)."""
    ui = UI(engine, read_only=read_only, poll=poll_seconds)
    routes = [
        Route("/", ui.index),
        Route("/live", ui.list_live),
        Route("/e/{id}", ui.execution),
        Route("/e/{id}/live", ui.execution_live),
        Route("/e/{id}/versions", ui.versions),
        Route("/e/{id}/flow", ui.flow),
        Route("/e/{id}/verify", ui.verify),
        Route("/e/{id}/{action}", ui.action, methods=["POST"]),
        Mount(
            "/static", StaticFiles(directory=HERE / "static", follow_symlink=True), name="static"
        ),
    ]
    middleware = (
        [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
        if allowed_hosts is not None
        else []
    )
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={404: ui.not_found})
    app.state.ui = ui
    return Guard(app, token)
