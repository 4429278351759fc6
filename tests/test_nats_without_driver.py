"""Without the optional nats-py driver, a NATS URL is still checked and the NATS package's
bytes-on-the-wire module still imports; only the backend itself asks for the ``nats`` extra.

Run in a child interpreter where ``import nats`` fails, as on an install without the extra.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_PROBE = textwrap.dedent(
    """
    import sys
    sys.modules["nats"] = None  # as if nats-py were not installed: import nats fails

    from stepsource.adapters.nats.wire import decode_token, encode_token, parse_nats_url
    from stepsource.adapters.urls import open_backend
    from stepsource.errors import UsageError

    assert decode_token(encode_token("a.b c")) == "a.b c"
    assert parse_nats_url("nats://h:4223?stream=S").servers == ("h:4223",)
    for url, expected in [
        ("nats://h:4222?replicas=many", "replicas must be a whole number"),
        ("nats://h:4222", "pip install 'stepsource[nats]'"),
    ]:
        try:
            open_backend(url)
        except UsageError as exc:
            assert expected in str(exc), (url, str(exc))
        else:
            raise AssertionError(f"{url} was accepted without the driver")
    assert "nats.aio" not in sys.modules
    print("ok")
    """
)


def test_a_nats_url_is_checked_without_the_driver(tmp_path: Path) -> None:
    # from an empty directory: the repository's root folders must not shadow the package
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
