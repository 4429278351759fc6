"""open_backend: which backend each URL names, and clear refusals for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepsource.adapters.contract import make_commit
from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.adapters.urls import open_backend
from stepsource.errors import UsageError, mask_credentials


def sqlite(url: str | None) -> SQLiteBackend:
    backend = open_backend(url)
    assert isinstance(backend, SQLiteBackend)
    return backend


def test_no_url_is_the_embedded_default() -> None:
    backend = sqlite(None)
    assert backend.path == "./stepsource.db"
    assert backend.synchronous == "full"
    assert backend.busy_timeout_ms == 30000


def test_memory() -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
    assert open_backend("memory://") is not open_backend("memory://")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///steps.db", "steps.db"),
        ("sqlite:///data/steps.db", "data/steps.db"),
        ("sqlite:////var/lib/steps.db", "/var/lib/steps.db"),
        ("SQLite:///steps.db", "steps.db"),
    ],
)
def test_sqlite_paths_follow_sqlalchemy(url: str, path: str) -> None:
    assert sqlite(url).path == path


def test_sqlite_options() -> None:
    backend = sqlite("sqlite:///steps.db?synchronous=normal&busy_timeout=5000")
    assert (backend.synchronous, backend.busy_timeout_ms) == ("normal", 5000)
    assert sqlite("sqlite:///steps.db?synchronous=FULL").synchronous == "full"
    assert sqlite("sqlite:///steps.db?busy_timeout=0").busy_timeout_ms == 0


@pytest.mark.parametrize(
    "url",
    [
        "",
        "steps.db",
        "mysql://localhost/steps",
        "memory://somewhere",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/steps.db",
        "sqlite:///data/",
        "sqlite:///:memory:",
        "sqlite:///steps.db?synchronous=off",
        "sqlite:///steps.db?busy_timeout=soon",
        "sqlite:///steps.db?busy_timeout=-1",
        "sqlite:///steps.db?busy_timeout=99999999999",
        "sqlite:///steps.db?journal=delete",
        "sqlite:///steps.db?synchronous=full&synchronous=normal",
        "sqlite:///steps.db?synchronous",
    ],
)
def test_bad_urls_show_the_accepted_forms(url: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_backend(url)
    message = str(caught.value)
    assert "memory://" in message
    assert "sqlite:////absolute/path.db" in message


def test_a_nats_url_names_the_nats_backend_without_connecting() -> None:
    backend = open_backend("nats://127.0.0.1:4222?stream=steps")  # no server: no I/O yet
    assert type(backend).__name__ == "NatsBackend"
    with pytest.raises(UsageError):
        open_backend("nats://127.0.0.1:4222?replicas=many")


def test_a_postgres_url_names_the_postgres_backend_without_connecting() -> None:
    for url in ("postgresql://u:p@127.0.0.1:5432/steps", "postgres://localhost/steps"):
        assert type(open_backend(url)).__name__ == "PostgresBackend"  # no server: no I/O yet
    with pytest.raises(UsageError):
        open_backend("postgresql://localhost/steps?schema=no-dashes")


@pytest.mark.anyio
async def test_a_url_backend_works(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = open_backend("sqlite:///relative.db?synchronous=normal")
    assert await backend.append(make_commit("s", 0)) == 1
    await backend.aclose()
    assert (tmp_path / "relative.db").exists()


def test_an_unknown_scheme_is_refused_without_its_password() -> None:
    with pytest.raises(UsageError) as caught:
        open_backend("postgress://app:hunter2@db:5432/steps")
    assert "hunter2" not in str(caught.value)
    assert "app:***@db" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:s3cr/Xy9@127.0.0.1:1/db",
        "postgresql://u:s3cr?Xy9@127.0.0.1:1/db",
        "redis://u:s3cr#Xy9@127.0.0.1:1/0",
        "nats://u:s3cr/Xy9@127.0.0.1:1",
    ],
)
def test_a_password_with_an_unencoded_delimiter_is_refused_without_showing_it(url: str) -> None:
    """``/``, ``?`` or ``#`` end a URL's user part: the rest was read as a port or a path,
    the error quoted the URL or part of the password ("... integer value as 'pa'")."""
    with pytest.raises(UsageError) as caught:
        open_backend(url)
    text = str(caught.value)
    assert "s3cr" not in text
    assert "Xy9" not in text
    assert "%2F" in text


def test_masking_keeps_paths_and_hides_any_userinfo() -> None:
    assert mask_credentials("sqlite:///dir@x/f.db") == "sqlite:///dir@x/f.db"
    assert mask_credentials("sqlite:////abs/dir@x/f.db") == "sqlite:////abs/dir@x/f.db"
    assert mask_credentials("'postgresql://u:pa/ss@h/db'") == "'postgresql://u:***@h/db'"
    assert mask_credentials("nats://tok@h:4222") == "nats://***@h:4222"
    with pytest.raises(UsageError) as caught:
        open_backend("sqlite://u:pa/ss@h/x.db")
    assert "pa/ss" not in str(caught.value)
    assert "names no host ('h')" in str(caught.value)
    # an "@" inside an option's value is no user part
    assert open_backend("nats://127.0.0.1:4222?stream=S&creds=/home/me@corp/user.creds")
