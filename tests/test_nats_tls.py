"""The NATS backend over TLS, with throwaway certificates (``stepsource.testing.tls``, made
with the ``openssl`` command line).

A self-signed CA signs a server certificate for 127.0.0.1 and a client certificate; a
second CA, which nothing trusts, signs a stranger's client certificate. Two nats-servers
run TLS on their client port: one with the server certificate only, one that also requires
a client certificate signed by the CA.

- With ``?tls_ca=`` an :class:`Engine` connects and runs a step end to end, and the server
  reports the connection as TLS.
- A server certificate the client does not trust (no ``tls_ca``, so the system's roots; or
  another CA) is refused with a :class:`BackendUnavailableError` naming the server and
  saying what to check, never a raw nats or ssl exception.
- When the server requires client certificates, connecting without ``tls_cert``/``tls_key``
  (or with a certificate of another CA) is refused with a BackendUnavailableError naming the
  server; with them it works.
- TLS files that cannot be loaded are a :class:`UsageError` before anything connects.

Asyncio only: nats-py has no trio support (the refusal of trio is tested in
tests/test_backend_nats.py).
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import stepsource as ss
from stepsource.adapters.contract_support import make_commit
from stepsource.adapters.urls import open_backend
from stepsource.errors import BackendUnavailableError, StepsourceError, UsageError
from stepsource.testing.nats_server import NatsServer
from stepsource.testing.tls import Certificates, make_certificates

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py runs on asyncio only


# -- certificates -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    # the openssl command line makes the certificates (it is on every machine of this kind)
    return make_certificates(tmp_path_factory.mktemp("certs"))


# -- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path_factory.mktemp("tls"),
        tls_cert=certs.server.cert,
        tls_key=certs.server.key,
        sync_interval=None,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path_factory.mktemp("mtls"),
        tls_cert=certs.server.cert,
        tls_key=certs.server.key,
        tls_ca=certs.ca,
        tls_verify=True,
        sync_interval=None,
    )
    with server:
        yield server


def _url(server: NatsServer, **tls: Path) -> str:
    options = "".join(f"&{name}={path}" for name, path in tls.items())
    return f"nats://127.0.0.1:{server.port}?stream=T{uuid.uuid4().hex[:12]}{options}"


def _connections(server: NatsServer) -> list[dict[str, Any]]:
    """The server's client connections, from its monitoring port (/connz)."""
    url = f"http://127.0.0.1:{server.http_port}/connz"
    with urllib.request.urlopen(url, timeout=5) as response:
        found: list[dict[str, Any]] = json.load(response)["connections"] or []
        return found


async def _run_a_step(url: str, server: NatsServer) -> None:
    """An engine on ``url`` runs a step with a recorded sub-step, end to end, and the server
    sees its connection as TLS."""
    engine = ss.Engine(url, poll_interval=0.05)

    @engine.step("tls.double")
    async def double(ctx: ss.StepContext, n: int) -> int:
        result: int = await ctx.do("double", lambda: n * 2)
        return result

    async with engine:
        handle = await engine.start("tls.double", {"n": 21})
        assert await handle.result(timeout=30) == 42
        connections = await anyio.to_thread.run_sync(_connections, server)
        ours = [c for c in connections if c.get("name") == "stepsource"]
        assert ours, connections
        assert all(str(c.get("tls_version", "")).startswith("1.") for c in ours), ours
    types = [type(event).__name__ for event in await engine.events(handle.execution_id)]
    assert types.count("SubStepCompleted") == 1
    assert types.count("StepCompleted") == 1
    await engine.aclose()


async def _refused(url: str, server: NatsServer) -> BackendUnavailableError:
    """Connecting to ``url`` is refused with a BackendUnavailableError that names the server
    (on the engine's first call and on the backend's); no raw nats or ssl exception."""
    engine = ss.Engine(url)
    with anyio.fail_after(15):  # a guard against a hang, not a measurement
        with pytest.raises(BackendUnavailableError) as caught:
            async with engine:
                pass
        backend = open_backend(url)
        with pytest.raises(BackendUnavailableError):
            await backend.append(make_commit("s", 0))
        await backend.aclose()
    await engine.aclose()
    error = caught.value
    assert type(error) is BackendUnavailableError
    assert isinstance(error, StepsourceError)
    assert error.__cause__ is None
    assert f"127.0.0.1:{server.port}" in str(error)
    assert error.hint  # what to check
    return error


# -- the tests --------------------------------------------------------------------------------
async def test_an_engine_runs_a_step_over_tls(tls_server: NatsServer, certs: Certificates) -> None:
    await _run_a_step(_url(tls_server, tls_ca=certs.ca), tls_server)


@pytest.mark.slow
async def test_an_untrusted_server_certificate_is_refused(
    tls_server: NatsServer, certs: Certificates
) -> None:
    errors: list[BackendUnavailableError] = []

    async def refused(url: str) -> None:
        errors.append(await _refused(url, tls_server))

    try:
        async with anyio.create_task_group() as group:  # the two cases side by side
            group.start_soon(refused, _url(tls_server))  # no tls_ca: the system's roots
            group.start_soon(refused, _url(tls_server, tls_ca=certs.other_ca))
    except* TimeoutError as hung:
        raise TimeoutError(f"{len(hung.exceptions)} connection attempt(s) hung") from None
    for error in errors:
        assert "certificate" in str(error)
        assert "tls_ca" in str(error)  # what to check


async def test_client_certificates_when_the_server_requires_them(
    mtls_server: NatsServer, certs: Certificates
) -> None:
    await _refused(_url(mtls_server, tls_ca=certs.ca), mtls_server)
    stranger = _url(
        mtls_server, tls_ca=certs.ca, tls_cert=certs.stranger.cert, tls_key=certs.stranger.key
    )
    await _refused(stranger, mtls_server)
    await _run_a_step(
        _url(mtls_server, tls_ca=certs.ca, tls_cert=certs.client.cert, tls_key=certs.client.key),
        mtls_server,
    )


@pytest.mark.parametrize("client", ["none", "stranger"])
async def test_a_refused_client_certificate_says_which_options_to_check(
    mtls_server: NatsServer, certs: Certificates, client: str
) -> None:
    pair = {"stranger": {"tls_cert": certs.stranger.cert, "tls_key": certs.stranger.key}}
    url = _url(mtls_server, tls_ca=certs.ca, **pair.get(client, {}))
    error = await _refused(url, mtls_server)
    assert "tls_cert" in str(error.hint)
    assert "tls_key" in str(error.hint)
    assert "certificate" in str(error)


async def test_tls_files_that_cannot_be_loaded_are_a_usage_error(
    tls_server: NatsServer, certs: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    bad = [
        _url(tls_server, tls_ca=missing),
        _url(tls_server, tls_ca=certs.ca, tls_cert=certs.client.cert, tls_key=missing),
        # a certificate with another certificate's key
        _url(tls_server, tls_ca=certs.ca, tls_cert=certs.client.cert, tls_key=certs.server.key),
    ]
    for url in bad:
        backend = open_backend(url)
        with pytest.raises(UsageError, match="TLS files"):
            await backend.open()
        await backend.aclose()
