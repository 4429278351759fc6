"""The PostgreSQL backend's URL: parsed here without the driver, so a bad URL is refused
even where psycopg is not installed.

``postgresql://user:password@host:port/dbname?schema=NAME`` (``postgres://`` too). The
password never appears in :func:`repr`, in :meth:`PostgresOptions.where` or in an error
message: everything a user sees names ``user@host:port/dbname`` and the schema only.

Options: ``schema`` (the tables' schema, created if missing; default ``stepsource``),
``pool_size`` (connections per event loop, default 10), ``connect_timeout`` (seconds,
default 10), ``sslmode`` (libpq's: disable, allow, prefer, require, verify-ca, verify-full),
``application_name``, ``durability``.

``durability`` (``warn``, the default; ``strict``; ``off``): an acknowledged commit must be on
disk, so the backend's sessions run with ``synchronous_commit=on`` whatever the server's
default, and at the first connection it reads the server's ``fsync``: off, it logs a warning
(``strict``: refuses to run). ``off`` leaves both as the server has them (a test server, or
a risk taken knowingly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from stepsource.errors import UsageError

__all__ = ["Durability", "PostgresOptions", "parse_postgres_url"]

#: what to do with a server whose acknowledged commits may not be on disk (module docstring)
Durability = Literal["warn", "strict", "off"]
_DURABILITIES: dict[str, Durability] = {"warn": "warn", "strict": "strict", "off": "off"}

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_FORMS = (
    "a PostgreSQL URL is postgresql://user:password@host:port/dbname?schema=NAME "
    "(options: schema, pool_size, connect_timeout, sslmode, application_name, "
    "durability=warn|strict|off)"
)


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    """Where the server is and how to talk to it (``password`` is kept out of ``repr``)."""

    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "postgres"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    schema: str = "stepsource"
    pool_size: int = 10
    connect_timeout: int = 10
    sslmode: str | None = None
    application_name: str = "stepsource"
    durability: Durability = "warn"

    def __post_init__(self) -> None:
        if not _SCHEMA.fullmatch(self.schema):
            raise UsageError(
                f"the PostgreSQL schema name {self.schema!r} is not a plain lower-case identifier",
                hint="Use letters a-z, digits and underscores, starting with a letter or "
                "underscore, at most 63 characters",
            )
        if not 1 <= self.pool_size <= 1000:
            raise UsageError(f"pool_size must be 1 to 1000, not {self.pool_size}")
        if not 1 <= self.connect_timeout <= 3600:
            raise UsageError(
                f"connect_timeout must be 1 to 3600 seconds, not {self.connect_timeout}"
            )
        if self.sslmode is not None and self.sslmode not in _SSLMODES:
            raise UsageError(f"sslmode must be one of {', '.join(_SSLMODES)}, not {self.sslmode!r}")

    def where(self) -> str:
        """``user@host:port/dbname (schema NAME)``: what messages name, never the password."""
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}/{self.dbname} (schema {self.schema})"

    def connect_kwargs(self) -> dict[str, str | int]:
        """The libpq connection parameters."""
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "connect_timeout": self.connect_timeout,
            "application_name": self.application_name,
        }
        if self.user is not None:
            params["user"] = self.user
        if self.password is not None:
            params["password"] = self.password
        if self.sslmode is not None:
            params["sslmode"] = self.sslmode
        if self.durability != "off":  # each commit waits for its WAL flush
            params["options"] = "-c synchronous_commit=on"
        return params


def _refuse(safe_url: str, why: str) -> UsageError:
    return UsageError(f"bad backend URL {safe_url!r}: {why}", hint=_FORMS)


def _without_password(url: str) -> str:
    """The URL as messages may show it: a password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hostport}{slash}{tail}"


def _int_option(safe: str, options: dict[str, str], name: str, default: int) -> int:
    raw = options.pop(name, None)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise _refuse(safe, f"{name} must be a whole number, not {raw!r}")
    return int(raw)


def parse_postgres_url(url: str) -> PostgresOptions:
    """The options a ``postgresql://`` or ``postgres://`` URL names; UsageError if bad."""
    safe = _without_password(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(safe, f"it cannot be read ({str(exc).replace(url, safe)})") from None
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise _refuse(safe, f"the scheme is {parts.scheme!r}, not postgresql")
    if parts.fragment:
        raise _refuse(safe, "it has a #fragment")
    dbname = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if "/" in dbname:
        raise _refuse(safe, f"the database name {dbname!r} has a slash")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _refuse(safe, "its options cannot be read") from None
    for key, value in pairs:
        if key in options:
            raise _refuse(safe, f"option {key!r} is given twice")
        options[key] = value
    schema = options.pop("schema", "stepsource")
    pool_size = _int_option(safe, options, "pool_size", 10)
    timeout = _int_option(safe, options, "connect_timeout", 10)
    sslmode = options.pop("sslmode", None)
    application = options.pop("application_name", "stepsource")
    durability = options.pop("durability", "warn").lower()
    if durability not in _DURABILITIES:
        raise _refuse(safe, f"durability must be warn, strict or off, not {durability!r}")
    if options:
        raise _refuse(safe, f"unknown option(s) {', '.join(sorted(options))}")
    try:
        return PostgresOptions(
            host=parts.hostname or "127.0.0.1",
            port=5432 if port is None else port,
            dbname=dbname or "postgres",
            user=None if parts.username is None else unquote(parts.username),
            password=None if parts.password is None else unquote(parts.password),
            schema=schema,
            pool_size=pool_size,
            connect_timeout=timeout,
            sslmode=sslmode,
            application_name=application,
            durability="strict"
            if durability == "strict"
            else "off"
            if durability == "off"
            else "warn",
        )
    except UsageError as exc:
        raise _refuse(safe, exc.reason) from None
