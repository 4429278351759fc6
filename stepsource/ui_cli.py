"""``stepsource ui``: serve the web UI (``stepsource.engine.ui``) with uvicorn.

It binds 127.0.0.1 unless told otherwise; any other address needs an access token (``--token``,
else ``$STEPSOURCE_UI_TOKEN``, else one generated here and printed once), which the browser
hands over once as ``?token=`` and then keeps in a cookie.
"""

from __future__ import annotations

import os
import sys

from stepsource.engine.engine import Engine
from stepsource.errors import UsageError

__all__ = ["LOOPBACK", "run_ui"]

LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
    app = create_app(engine, read_only=read_only, token=token)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/"
    mode = "read-only" if read_only else "actions enabled"
    print(
        f"stepsource ui on {address} ({mode}, {engine.url or 'default backend'})", file=sys.stderr
    )
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
    uvicorn.Server(config).run()
    return 0
