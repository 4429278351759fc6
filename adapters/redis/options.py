"""What a ``redis://`` or ``rediss://`` URL says, parsed without the redis-py driver.

::

    redis://[user:password@]host[:port][/db][?prefix=NAME&durability=warn|strict|off]
    rediss://...  (TLS; options tls_ca=/path, tls_cert=/path&tls_key=/path, tls_verify=no)

``prefix`` (default ``stepsource``) starts every key the backend creates, so several logs may
share one database. ``durability`` says what to do when the server's append-only file
settings do not make an acknowledged write durable (``appendonly yes`` and
``appendfsync always``): ``warn`` (the default) logs a warning at connect, ``strict`` refuses
to connect (:class:`~stepsource.errors.BackendUnavailableError`), ``off`` says nothing.
``readmodels=/path/file.db`` keeps the engine's read models in that local SQLite file
instead of an in-memory index rebuilt from the log when an engine starts.

The password is kept out of ``repr`` and every error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from stepsource.errors import UsageError

__all__ = ["REDIS_FORMS", "RedisOptions", "parse_redis_url"]

REDIS_FORMS = (
    "a Redis URL is redis://[user:password@]host[:port][/db][?prefix=NAME"
    "&durability=warn|strict|off&readmodels=/path/file.db] or rediss://... for TLS "
    "(&tls_ca=/path&tls_cert=/path&tls_key=/path&tls_verify=yes|no)"
)
_PREFIX_FORBIDDEN = frozenset(" \t\r\n\x00")

Durability = Literal["warn", "strict", "off"]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Where the server is, how to log in, and the key prefix of this log."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify: bool = True
    prefix: str = "stepsource"
    durability: Durability = "warn"
    readmodels: str | None = None

    def __post_init__(self) -> None:
        if not self.prefix or any(c in _PREFIX_FORBIDDEN for c in self.prefix):
            raise UsageError(
                f"the key prefix must be non-empty text without spaces, not {self.prefix!r}",
                hint=REDIS_FORMS,
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("tls_cert and tls_key go together", hint=REDIS_FORMS)
        if not self.tls and (self.tls_ca or self.tls_cert or not self.tls_verify):
            raise UsageError("TLS options need a rediss:// URL", hint=REDIS_FORMS)

    @property
    def where(self) -> str:
        """``host:port/db``, for messages (never the credentials)."""
        return f"{self.host}:{self.port}/{self.db}"

    @property
    def url(self) -> str:
        """The URL without the password (for logs and reprs)."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.where}?prefix={self.prefix}"


def _refuse(url: str, why: str) -> UsageError:
    return UsageError(f"bad Redis URL {_redact(url)!r}: {why}", hint=REDIS_FORMS)


def _redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostport}{slash}{tail}"


def _flag(url: str, name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "1"):
        return True
    if lowered in ("no", "false", "0"):
        return False
    raise _refuse(url, f"{name} must be yes or no, not {value!r}")


def parse_redis_url(url: str) -> RedisOptions:
    """The options a ``redis://`` / ``rediss://`` URL gives; :class:`UsageError` if bad."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise _refuse(url, f"it cannot be read ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise _refuse(url, f"the scheme must be redis or rediss, not {scheme!r}")
    if parts.fragment:
        raise _refuse(url, "it has a #fragment")
    if not host:
        raise _refuse(url, "it names no host")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise _refuse(url, f"the database must be a number, not {path!r}")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise _refuse(url, f"its options cannot be read ({exc})") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise _refuse(url, f"option {key!r} is given twice")
        options[key] = value
    durability = options.pop("durability", "warn").lower()
    if durability not in ("warn", "strict", "off"):
        raise _refuse(url, f"durability must be warn, strict or off, not {durability!r}")
    prefix = options.pop("prefix", "stepsource")
    readmodels = options.pop("readmodels", None)
    if readmodels is not None and not readmodels:
        raise _refuse(url, "readmodels names no file")
    tls_verify = _flag(url, "tls_verify", options.pop("tls_verify", "yes"))
    tls = {key: options.pop(key) for key in ("tls_ca", "tls_cert", "tls_key") if key in options}
    if options:
        raise _refuse(url, f"unknown option(s) {', '.join(sorted(options))}")
    try:
        return RedisOptions(
            host=host,
            port=6379 if port is None else port,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=scheme == "rediss",
            tls_ca=tls.get("tls_ca"),
            tls_cert=tls.get("tls_cert"),
            tls_key=tls.get("tls_key"),
            tls_verify=tls_verify,
            prefix=prefix,
            durability="strict"
            if durability == "strict"
            else "off"
            if durability == "off"
            else "warn",
            readmodels=readmodels,
        )
    except UsageError as exc:
        raise _refuse(url, exc.reason) from None
