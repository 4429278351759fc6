"""``stepsource ui``: serve the web UI (``stepsource.engine.ui``) with uvicorn.

It binds 127.0.0.1 unless told otherwise; any other address needs an access token (``--token``,
else ``$STEPSOURCE_UI_TOKEN``, else one generated here and printed once), which the browser
hands over once as ``?token=`` and then keeps in a cookie. Served on loopback without a token,
it answers only requests addressed to a loopback name (``Host: 127.0.0.1``, ``localhost``,
``[::1]``): a web page whose name was made to point at 127.0.0.1 (DNS rebinding) cannot read
it or act through it.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from stepsource.engine.engine import Engine
from stepsource.errors import UsageError, mask_credentials

__all__ = ["LOOPBACK", "LOOPBACK_HOSTS", "cannot_listen", "listening_socket", "run_ui"]

LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: the Host header names a loopback server without a token answers (IPv6 in brackets)
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")


def run_ui(
    engine: Engine,
    *,
    host: str,
    port: int,
    read_only: bool,
    token: str | None,
) -> int:
    try:
        import uvicorn

        from stepsource.engine.ui import create_app
        from stepsource.engine.ui.security import new_token
    except ImportError as error:
        raise UsageError(
            f"the web UI needs the `ui` extra ({error.name} is missing)",
            hint="pip install 'stepsource[ui]'",
        ) from None
    token = token or os.environ.get("STEPSOURCE_UI_TOKEN") or None
    if token is None and host not in LOOPBACK:
        token = new_token()
    hosts = LOOPBACK_HOSTS if token is None else None  # a token guards any other name
    app = create_app(engine, read_only=read_only, token=token, allowed_hosts=hosts)
    sock = listening_socket(host, port, "--port")
    port = sock.getsockname()[1]  # the one the system picked for --port 0
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/"
    mode = "read-only" if read_only else "actions enabled"
    backend = mask_credentials(engine.url or "") or "default backend"
    print(f"stepsource ui on {address} ({mode}, {backend})", file=sys.stderr)
    if token is not None:
        print(f"open {address}?token={token}", file=sys.stderr)
    sys.stderr.flush()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def listening_socket(host: str, port: int, flag: str) -> socket.socket:
    """A socket listening on ``host:port``, or a UsageError saying why not (the address is
    taken, or not this machine's) before anything claims to serve there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise cannot_listen(flag, host, port, error) from None


def cannot_listen(flag: str, host: str, port: int, error: OSError) -> UsageError:
    """The error of a server that could not listen on ``host:port`` (``flag`` named the port;
    its host flag is ``flag`` with ``host`` for ``port``): the flag at fault leads it."""
    why = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EADDRINUSE:
        return UsageError(
            f"{flag} {port}: cannot listen on {host}:{port} ({why})",
            hint="Pick another port, or stop what listens there",
        )
    host_flag = flag.replace("port", "host")
    return UsageError(
        f"{host_flag} {host}: cannot listen on {host}:{port} ({why})",
        hint=f"Give {host_flag} an address of this machine (127.0.0.1 by default, 0.0.0.0 for all)",
    )
