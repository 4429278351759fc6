"""Throwaway TLS certificates and a TLS terminator, for testing clients that speak TLS to
servers built without it.

:func:`make_certificates` makes, with the ``openssl`` command line, a CA that signs a server
certificate for 127.0.0.1 and a client certificate, and a second CA that nothing trusts,
which signs a stranger's client certificate (keys: EC P-256; valid two days).

:class:`TlsTerminator` listens on 127.0.0.1 with TLS (the server certificate; optionally
requiring a client certificate signed by a given CA) and forwards each connection's
plaintext to a port on 127.0.0.1, as ``stunnel`` does in front of a server without TLS. It
runs its own event loop in a thread, so any client (sync or async, asyncio or trio) can use
it, and records the handshakes it completed and the client certificates it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["Certificates", "KeyPair", "TlsTerminator", "make_certificates"]

_HOST = "127.0.0.1"

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca
[dn]
CN = {name}
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
{alt_names}
"""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    """What :func:`make_certificates` made."""

    ca: Path  # signs the server's and the client's certificates
    other_ca: Path  # trusted by no one
    server: KeyPair  # serverAuth, for IP 127.0.0.1, signed by ca
    client: KeyPair  # clientAuth, CN "client", signed by ca
    stranger: KeyPair  # clientAuth, CN "stranger", signed by other_ca


def _openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=folder, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _ca(folder: Path, name: str) -> KeyPair:
    config = folder / f"{name}.cnf"
    config.write_text(_CA_CONFIG.format(name=f"stepsource test {name}"))
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
        "-config", str(config),
    )  # fmt: skip
    return pair


def _leaf(folder: Path, name: str, ca: KeyPair, usage: str, alt_names: str = "") -> KeyPair:
    pair = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(_LEAF_EXTENSIONS.format(usage=usage, alt_names=alt_names))
    _openssl(
        folder, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", str(pair.key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        folder, "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey",
        str(ca.key), "-set_serial", str(secrets.randbits(63)), "-days", "2",
        "-out", str(pair.cert), "-extfile", str(extensions),
    )  # fmt: skip
    return pair


def make_certificates(folder: Path) -> Certificates:
    """Make the test certificates in ``folder`` (needs the ``openssl`` command line)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("install openssl (the command line) to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(folder, "ca"), _ca(folder, "other-ca")
    return Certificates(
        ca=ca.cert,
        other_ca=other.cert,
        server=_leaf(folder, "server", ca, "serverAuth", "subjectAltName = IP:127.0.0.1"),
        client=_leaf(folder, "client", ca, "clientAuth"),
        stranger=_leaf(folder, "stranger", other, "clientAuth"),
    )


@dataclass
class TlsTerminator:
    """TLS on :attr:`port` in front of plaintext ``target_port`` (both on 127.0.0.1)."""

    target_port: int
    server: KeyPair
    client_ca: Path | None = None  # if set, a client certificate signed by it is required
    port: int = 0
    #: TLS handshakes completed, and the subject CN of each client certificate presented
    handshakes: int = 0
    client_names: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server.cert, self.server.key)
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca)
        return context

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            writer.close()

    async def _serve_one(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.handshakes += 1  # the server callback runs once the handshake succeeded
        peer = client_writer.get_extra_info("peercert") or {}
        for rdn in peer.get("subject", ()):
            self.client_names += [value for key, value in rdn if key == "commonName"]
        try:
            target_reader, target_writer = await asyncio.open_connection(_HOST, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer)
        )

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve_one, _HOST, 0, ssl=self._context())
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> TlsTerminator:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ready))
                tasks = asyncio.all_tasks(loop)  # the connections still open: end them
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="tls-terminator", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the TLS terminator did not start")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)
