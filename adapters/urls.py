"""Backend URLs: ``open_backend(url)`` turns the URL a user gives into a :class:`Backend`.

Accepted forms (SQLite URLs follow SQLAlchemy: three slashes then a relative path, four
for an absolute one)::

    None                                  ./stepsource.db, the embedded default
    memory://                             an in-process log (tests)
    sqlite:///relative/path.db            relative to the current directory
    sqlite:////absolute/path.db           absolute
    sqlite:///steps.db?synchronous=normal&busy_timeout=5000
    nats://u:p@host:4222,host2:4222?stream=NAME&replicas=3   NATS JetStream (the nats extra)
    redis://u:p@host:6379/0?prefix=NAME    Redis (the redis extra); rediss:// for TLS
    postgresql://user:password@host:5432/dbname?schema=NAME   PostgreSQL (the postgres extra;
                                          postgres:// too)

Nothing is opened here: the backend connects on first use.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import Backend
from stepsource.adapters.sqlite import SQLiteBackend
from stepsource.errors import UsageError, mask_credentials

__all__ = ["DEFAULT_PATH", "open_backend"]

DEFAULT_PATH = "./stepsource.db"

_FORMS = (
    "accepted backend URLs: memory://, sqlite:///relative/path.db, "
    "sqlite:////absolute/path.db (options: ?synchronous=full|normal&busy_timeout=MS), "
    "nats://host:4222[,host:port...]?stream=NAME (NATS JetStream, the nats extra), "
    "redis://host:6379/0?prefix=NAME (Redis, the redis extra), "
    "postgresql://user:password@host:5432/dbname?schema=NAME (PostgreSQL, the postgres extra), "
    "or no URL for ./stepsource.db"
)


def _refuse(url: str, why: str) -> UsageError:
    return UsageError(f"bad backend URL {mask_credentials(url)!r}: {why}", hint=_FORMS)


def open_backend(url: str | None) -> Backend:
    """The backend a URL names (not yet opened); :class:`UsageError` for a bad URL."""
    if url is None:
        return SQLiteBackend(DEFAULT_PATH)
    if not isinstance(url, str):
        raise UsageError(f"a backend URL is a string, not {type(url).__name__}", hint=_FORMS)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _refuse(url, "it has no scheme")
    scheme = scheme.lower()
    if scheme in _NETWORK:
        _check_userinfo(url, rest)
    if scheme == "memory":
        if rest:
            raise _refuse(url, "memory:// takes no path or options")
        return MemoryBackend()
    if scheme == "sqlite":
        return _sqlite(url, rest)
    if scheme == "nats":
        return _nats(url)
    if scheme in ("redis", "rediss"):
        return _redis(url)
    if scheme in ("postgresql", "postgres"):
        return _postgres(url)
    raise _refuse(url, f"unknown scheme {scheme!r}")


_NETWORK = ("nats", "redis", "rediss", "postgresql", "postgres")


def _check_userinfo(url: str, rest: str) -> None:
    """Refuse a user or password holding ``/``, ``?`` or ``#`` unencoded: a URL parser ends
    the authority there, so the rest would be read as a host, a port or a path, and its
    error would quote part of the password."""
    userinfo, at, _ = rest.rpartition("@")
    if "=" in userinfo.partition("?")[2]:
        return  # the "@" is in an option's value (a file path, a name): no user part there
    if at and any(c in userinfo for c in "/?#"):
        shown = url.partition("://")[0] + "://***@" + rest.rpartition("@")[2]
        raise UsageError(
            f"bad backend URL {mask_credentials(shown)!r}: the user or password before its "
            "'@' holds '/', '?' or '#', which end that part of a URL",
            hint="Percent-encode them in the URL: / as %2F, ? as %3F, # as %23 "
            "(urllib.parse.quote(password, safe=''))",
        )


def _sqlite(url: str, rest: str) -> SQLiteBackend:
    location, _, query = rest.partition("?")
    if not location.startswith("/"):
        host = location.rpartition("@")[2].partition("/")[0]  # never echo credentials
        why = f"a SQLite URL names no host ({host!r})" if host else "it names no file"
        raise _refuse(url, why)
    path = location[1:]
    if not path or path.endswith("/"):
        raise _refuse(url, "it names no file")
    if path == ":memory:":
        raise _refuse(url, "an in-memory SQLite file cannot be shared: use memory://")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise _refuse(url, f"its options cannot be read ({exc})") from None
    for key, value in pairs:
        if key in options:
            raise _refuse(url, f"option {key!r} is given twice")
        options[key] = value
    synchronous = options.pop("synchronous", "full").lower()
    if synchronous not in ("full", "normal"):
        raise _refuse(url, f"synchronous must be full or normal, not {synchronous!r}")
    timeout = options.pop("busy_timeout", "30000")
    if not (timeout.isascii() and timeout.isdigit()):
        raise _refuse(url, f"busy_timeout must be a whole number of milliseconds, not {timeout!r}")
    if options:
        raise _refuse(url, f"unknown option(s) {', '.join(sorted(options))}")
    try:
        return SQLiteBackend(path, synchronous=synchronous, busy_timeout_ms=int(timeout))
    except UsageError as exc:
        raise _refuse(url, exc.reason) from None


def _nats(url: str) -> Backend:
    from stepsource.adapters.nats.wire import parse_nats_url

    options = parse_nats_url(url)  # a bad URL is refused even without the driver
    try:
        from stepsource.adapters.nats import NatsBackend
    except ImportError as exc:
        raise UsageError(
            f"the NATS backend needs the nats-py driver, which is not installed ({exc})",
            hint="pip install 'stepsource[nats]'",
        ) from None
    return NatsBackend(options)


def _redis(url: str) -> Backend:
    from stepsource.adapters.redis.options import parse_redis_url

    options = parse_redis_url(url)  # a bad URL is refused even without the driver
    try:
        from stepsource.adapters.redis.backend import RedisBackend
    except ImportError as exc:
        raise UsageError(
            f"the Redis backend needs the redis-py driver, which is not installed ({exc})",
            hint="pip install 'stepsource[redis]'",
        ) from None
    return RedisBackend(options)


def _postgres(url: str) -> Backend:
    from stepsource.adapters.postgres.options import parse_postgres_url

    options = parse_postgres_url(url)  # a bad URL is refused even without the driver
    try:
        from stepsource.adapters.postgres.backend import PostgresBackend
    except ImportError as exc:
        raise UsageError(
            f"the PostgreSQL backend needs the psycopg driver, which is not installed ({exc})",
            hint="pip install 'stepsource[postgres]'",
        ) from None
    return PostgresBackend(options)
