"""The web UI's guards: an access token when it is reachable from other machines, a CSRF
token on every state-changing request, and headers that keep pages from running anything
but the UI's own script (Content-Security-Policy without inline scripts)."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["COOKIE", "Guard", "new_token", "same_token"]

COOKIE = "stepsource_ui_token"
HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware: adds the security headers; with a ``token``, answers 401 to requests
    that carry it neither as ``?token=`` (which sets a cookie and redirects to the same page
    without it), nor as that cookie, nor as ``Authorization: Bearer``."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if same_token(query.get("token"), self.token):
                rest = urlencode({k: v for k, v in query.items() if k != "token"})
                location = page_path(scope) + ("?" + rest if rest else "")
                # the UI's own path: mounted in a service, the token goes to no other route
                path = scope.get("root_path") or "/"
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path={path}"
                await _respond(
                    send,
                    303,
                    b"",
                    [(b"location", location.encode()), (b"set-cookie", cookie.encode())],
                )
                return
            if not self._carries_token(scope):
                await _respond(
                    send,
                    401,
                    b"This stepsource UI needs its access token: open the address it printed "
                    b"(with ?token=...).\n",
                    [(b"content-type", b"text/plain; charset=utf-8")],
                )
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _carries_token(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                kind, _, given = value.decode("latin-1").partition(" ")
                if kind.lower() == "bearer" and same_token(given.strip(), self.token):
                    return True
            elif name == b"cookie" and same_token(cookie(value, COOKIE), self.token):
                return True
        return False


def page_path(scope: Scope) -> str:
    """The path the browser asked for: ``path`` holds the mount's prefix (``root_path``)
    already under a Starlette ``Mount`` and ASGI servers that follow the specification;
    it is added where a server gave the path without it."""
    root, path = str(scope.get("root_path", "")), str(scope["path"])
    return path if path.startswith(root) else root + path


def cookie(header: bytes, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header. Read pair by pair, as browsers send
    them: another application's cookie on the same host that is not in the strict RFC
    syntax (a space or a quote in its value) must not hide this one."""
    for pair in header.decode("latin-1").split(";"):
        key, eq, value = pair.strip().partition("=")
        if eq and key == name:
            return value.strip().strip('"')
    return None


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *HEADERS]})
    await send({"type": "http.response.body", "body": body})
