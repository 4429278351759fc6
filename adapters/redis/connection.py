"""The one object every part of the Redis backend goes through: the redis-py asyncio client.

It connects lazily (one client per asyncio event loop: a call from another loop connects
again there) and closes when :meth:`RedisConnection.aclose` is awaited or, failing that, when
its event loop shuts down: each client is watched by an async generator started in its loop,
which ``loop.shutdown_asyncgens()`` (run by ``asyncio.run`` and ``anyio.run``) closes, and
whose ``finally`` closes the client's sockets there. An engine used for one-shot queries
outside ``async with`` therefore leaves no socket open behind its loop.

At connect it checks whether the server makes an acknowledged write durable
(``appendonly yes`` and ``appendfsync always``, read with ``CONFIG GET``). It runs the Lua
scripts of :mod:`~stepsource.adapters.redis.scripts` by SHA1 (loading them again when a
restarted server answers NOSCRIPT), pipelines batches of them, and turns every driver error
into a :class:`~stepsource.errors.StepsourceError` at this boundary. redis-py's own retries
are switched off: a script that may have run must never run twice (a post would be
delivered twice); the engine's actors recover from an unknown outcome by replay instead.

redis-py's asyncio API runs on asyncio only: under trio every call raises
:class:`~stepsource.errors.UsageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from stepsource.adapters.redis.keys import Keys
from stepsource.adapters.redis.options import RedisOptions
from stepsource.adapters.redis.scripts import ALL, Script
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    StepsourceError,
    UsageError,
)

__all__ = ["Arg", "RedisConnection", "to_bytes", "to_text"]

_logger = logging.getLogger("stepsource.redis")
Arg = str | bytes | int


def to_bytes(value: object) -> bytes:
    """A value the server sent as bytes (or, with other client settings, str)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected bytes from the server, got {type(value).__name__}")


def to_text(value: object) -> str:
    """A value the server sent, as text (UTF-8)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisConnection:
    """A lazily connected redis-py client for one :class:`RedisOptions`."""

    def __init__(
        self, options: RedisOptions, *, socket_timeout: float = 30.0, connect_timeout: float = 5.0
    ) -> None:
        self.options = options
        self.keys = Keys(options.prefix)
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        #: what the server said at the last connect: {"appendonly": ..., "appendfsync": ...}
        #: (empty if it would not say)
        self.server_settings: dict[str, str] = {}
        self._client: redis.asyncio.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned = False
        self._watch: AsyncGenerator[None, None] | None = None  # closes the client (see above)
        #: the connection :meth:`run` sends script calls on, taken from the pool of the
        #: client it belongs to and kept (see there); whether a call is on it
        self._kept: tuple[redis.asyncio.Redis, redis.asyncio.Connection] | None = None
        self._kept_busy = False
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"RedisConnection({self.options.url!r})"

    # -- errors -----------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        password = self.options.password
        return text.replace(password, "***") if password else text

    def unavailable(self, what: str, cause: object, hint: str | None = None) -> StepsourceError:
        """The error for a failed call: the server, what failed and why, never a password."""
        return BackendUnavailableError(
            self._scrub(f"Redis at {self.options.where} failed to {what} ({cause})"),
            hint=hint
            or "Check that redis-server runs there and is reachable; a write whose answer "
            "was lost may or may not have been stored (the engine resumes by replay)",
        )

    def translate(self, what: str, exc: BaseException) -> StepsourceError:
        """A driver or socket error as the StepsourceError the engine understands."""
        if isinstance(
            exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError
        ):
            return self.unavailable(
                what,
                "the server refused the credentials",
                hint="Check the user and password in the redis:// URL",
            )
        if isinstance(exc, redis.exceptions.ResponseError) and "STEPSOURCE" in str(exc):
            return self.script_failure(what, str(exc))
        hint = "Check that redis-server runs there and is reachable" if what == "connect" else None
        if self.options.tls and (what == "connect" or "SSL" in str(exc)):
            hint = (
                "Check that redis-server runs there and serves TLS on that port (rediss://), "
                "that tls_ca= names the CA that signed the server's certificate (or the "
                "system's roots trust it) for the host name in the URL, and, if the server "
                "requires client certificates, that tls_cert= and tls_key= give one its CA "
                "signed"
            )
        return self.unavailable(what, f"{type(exc).__name__}: {exc}", hint)

    def script_failure(self, what: str, message: str) -> StepsourceError:
        """The error for a command or script the server failed with ``message``: a damaged
        log (a script found what it needs missing: ``STEPSOURCE ...``) or a failed call."""
        if "STEPSOURCE" in message:
            return CorruptLogError(
                self._scrub(
                    f"the Redis log under prefix {self.options.prefix!r} is damaged ({message})"
                ),
                hint="Restore the server's data from a backup",
            )
        return self.unavailable(what, f"ResponseError: {message}")

    def no_answer(self, what: str) -> StepsourceError:
        """The error for a call the server did not answer within the socket timeout."""
        return self.unavailable(what, f"no answer within {self.socket_timeout:g} s")

    @contextlib.asynccontextmanager
    async def guard(self, what: str) -> AsyncIterator[None]:
        """Run the block within the socket timeout, translating driver errors (for ``what``
        is being done)."""
        try:
            async with asyncio.timeout(self.socket_timeout):
                yield
        except StepsourceError:
            raise
        except TimeoutError:  # (an OSError: before the clause below)
            raise self.no_answer(what) from None
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self.translate(what, exc) from None

    # -- connection -------------------------------------------------------------------------
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError(
                "the Redis backend runs on asyncio only: its driver's asyncio API (redis-py) "
                "has no support for trio or other event loops",
                hint="Run stepsource under asyncio (anyio.run(..., backend='asyncio')), or "
                "use a sqlite:// or memory:// URL",
            ) from None

    async def client(self) -> redis.asyncio.Redis:
        """The connected client of the running loop (connecting if needed)."""
        loop = self._running_loop()
        client = self._client
        if client is not None and self._loop is loop:
            return client
        if client is not None:  # a client of a loop that did not shut down: let it go
            self._client, self._loop, self._watch = None, None, None
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            if self._client is not None and self._loop is loop:
                return self._client
            client = await self._connect()
            watch = self._watching(client)
            await watch.__anext__()  # now the loop knows it, and closes it at shutdown
            self._client, self._loop, self._watch = client, loop, watch
            return client

    async def _watching(self, client: redis.asyncio.Redis) -> AsyncGenerator[None, None]:
        """Suspended until :meth:`aclose` or the loop's shutdown closes it; then closes the
        client (and forgets it, if it is still the current one)."""
        try:
            yield
        finally:
            if self._client is client:
                self._client, self._loop, self._watch = None, None, None
            with contextlib.suppress(redis.exceptions.RedisError, OSError, RuntimeError):
                await client.aclose()

    def _check_tls_files(self) -> None:
        """Load the URL's TLS files into a throwaway context: a file that is missing or is
        not what it should be is the user's mistake (UsageError), not an outage."""
        o = self.options
        context = ssl.create_default_context()
        option = "tls_ca"
        try:
            if o.tls_ca is not None:
                context.load_verify_locations(o.tls_ca)
            option = "tls_cert/tls_key"
            if o.tls_cert is not None:
                context.load_cert_chain(o.tls_cert, o.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"the {option} file(s) of the Redis URL for {o.where} cannot be loaded "
                f"({type(exc).__name__}: {exc})",
                hint="Tls_ca= names a PEM file of CA certificates; tls_cert= and tls_key= a "
                "PEM certificate and its unencrypted private key",
            ) from None

    def _new_client(self) -> redis.asyncio.Redis:
        o = self.options
        tls: dict[str, Any] = {}
        if o.tls:
            self._check_tls_files()
            tls = {
                "ssl": True,
                "ssl_ca_certs": o.tls_ca,
                "ssl_certfile": o.tls_cert,
                "ssl_keyfile": o.tls_key,
                "ssl_cert_reqs": "required" if o.tls_verify else "none",
                "ssl_check_hostname": o.tls_verify,
                "ssl_min_version": ssl.TLSVersion.TLSv1_2,
            }
        return redis.asyncio.Redis(
            host=o.host,
            port=o.port,
            db=o.db,
            username=o.username,
            password=o.password,
            # every call is bounded by ``socket_timeout`` here instead (guard and run, with
            # asyncio.timeout): redis-py's own wraps each command's send in asyncio.wait_for,
            # a task per command (about a tenth of a lone commit's client time)
            socket_timeout=None,
            socket_connect_timeout=self.connect_timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="stepsource",
            **tls,
        )

    async def _connect(self) -> redis.asyncio.Redis:
        client = self._new_client()
        try:
            async with self.guard("connect"):
                await client.ping()
                self.server_settings = await self._settings(client)
                self._check_durability()
                pipe = client.pipeline(transaction=False)
                for script in ALL:
                    pipe.script_load(script.source)
                await pipe.execute()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _settings(self, client: redis.asyncio.Redis) -> dict[str, str]:
        try:
            raw = await client.config_get("append*")
        except redis.exceptions.ResponseError:  # CONFIG renamed or forbidden (managed Redis)
            return {}
        settings = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            settings[name] = (value.decode() if isinstance(value, bytes) else str(value)).lower()
        return settings

    @property
    def durable(self) -> bool:
        """Whether the server said an acknowledged write is on disk (append-only file,
        fsync before every answer)."""
        settings = self.server_settings
        return settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always"

    def _check_durability(self) -> None:
        if self.durable or self.options.durability == "off":
            return
        settings = self.server_settings
        said = (
            f"appendonly {settings.get('appendonly', '?')}, "
            f"appendfsync {settings.get('appendfsync', '?')}"
            if settings
            else "CONFIG GET is not allowed, so its settings are unknown"
        )
        why = (
            f"Redis at {self.options.where} does not make an acknowledged write durable "
            f"({said}): a server crash or power loss may lose acknowledged steps"
        )
        fix = (
            "configure the server with 'appendonly yes' and 'appendfsync always', or accept "
            "the risk with ?durability=warn (the default) or ?durability=off in the URL"
        )
        if self.options.durability == "strict":
            raise BackendUnavailableError(why, hint=fix)
        if not self._warned:  # once per backend object, not at every reconnect
            self._warned = True
            _logger.warning("%s. To fix: %s", why, fix)

    async def aclose(self) -> None:
        watch = self._watch
        loop = self._loop
        self._client, self._loop, self._watch = None, None, None
        if watch is not None and loop is asyncio.get_running_loop():
            await watch.aclose()  # closes the client

    # -- plain reads ------------------------------------------------------------------------
    async def hmget(self, key: str, fields: Sequence[str], what: str) -> list[bytes | None]:
        """The hash's fields (None where absent)."""
        client = await self.client()
        async with self.guard(what):
            values = await client.hmget(key, list(fields))
        return [None if value is None else to_bytes(value) for value in values]

    async def xrange(
        self, key: str, start: str, count: int, what: str
    ) -> list[tuple[int, dict[bytes, bytes]]]:
        """Up to ``count`` entries of a Redis stream from entry id ``start`` on: the first
        part of each entry id (``<n>-0``) and its fields."""
        client = await self.client()
        async with self.guard(what):
            entries = await client.xrange(key, min=start, count=count)
        out = []
        for entry_id, fields in entries or ():
            number = to_text(entry_id).partition("-")[0]
            out.append((int(number), {to_bytes(k): to_bytes(v) for k, v in (fields or {}).items()}))
        return out

    # -- scripts ----------------------------------------------------------------------------
    def _argv(self, args: Sequence[Arg]) -> list[Arg]:
        return [self.options.prefix, *args]

    async def run(self, script: Script, args: Sequence[Arg], what: str) -> Any:
        """Run one script (its ``ARGV`` after the prefix) and return its answer.

        It goes over the connection kept for script calls when no other call is on it:
        redis-py's connection API (send the command, read its answer) instead of the
        client's per-command path, which takes a connection from the pool and gives it back
        and goes through its retry and event machinery (a third of a lone commit's client
        time, with nothing to do here: retries are off). A call made while the kept
        connection is busy goes through the pool."""
        client = await self.client()
        argv = self._argv(args)
        kept = not self._kept_busy
        self._kept_busy = True  # claimed before any await: one call at a time on it
        try:  # (not self.guard: this is the hot path of a lone commit)
            async with asyncio.timeout(self.socket_timeout):
                call = await self._kept_call(client) if kept else client.execute_command
                try:
                    return await call("EVALSHA", script.sha, 0, *argv)
                except redis.exceptions.NoScriptError:  # a restarted server forgot it (not run)
                    await call("SCRIPT", "LOAD", script.source)
                    return await call("EVALSHA", script.sha, 0, *argv)
        except TimeoutError:
            raise self.no_answer(what) from None
        except (redis.exceptions.RedisError, OSError) as exc:
            raise self.translate(what, exc) from None
        finally:
            if kept:
                self._kept_busy = False

    async def _kept_call(self, client: redis.asyncio.Redis) -> Callable[..., Awaitable[Any]]:
        """Send a command on the kept connection and read its answer. The connection is
        taken from ``client``'s pool once, and checked before each call as the pool checks
        one it hands out (one the server closed, by a restart, connects again); one that
        failed mid-call is dropped by redis-py and connects again at its next use."""
        kept = self._kept
        if kept is None or kept[0] is not client:  # a new client: the old one closed its own
            pool = client.connection_pool  # (redis-py leaves get_connection untyped)
            kept = self._kept = (client, await pool.get_connection())  # type: ignore[no-untyped-call]
        conn = kept[1]
        await client.connection_pool.ensure_connection(conn)

        async def call(*command: Any) -> Any:
            await conn.send_command(*command)
            return await conn.read_response()

        return call

    async def run_many(self, calls: Sequence[tuple[Script, Sequence[Arg]]], what: str) -> list[Any]:
        """Run scripts in one pipeline (one round trip; with ``appendfsync always`` the
        server fsyncs them together). Each answer is the script's result or the
        StepsourceError it failed with: one call's failure never fails another."""
        if len(calls) == 1:  # a lone call needs no pipeline (less work in redis-py)
            script, args = calls[0]
            try:
                return [await self.run(script, args, what)]
            except StepsourceError as exc:
                if isinstance(exc, UsageError):
                    raise
                return [exc]
        client = await self.client()
        answers: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        async with self.guard(what):
            for _ in range(2):
                pipe = client.pipeline(transaction=False)
                for index in todo:
                    script, args = calls[index]
                    pipe.evalsha(script.sha, 0, *self._argv(args))
                results = await pipe.execute(raise_on_error=False)
                missing = []
                for index, result in zip(todo, results, strict=True):
                    if isinstance(result, redis.exceptions.NoScriptError):
                        missing.append(index)  # never ran: safe to run again
                    elif isinstance(result, Exception):
                        answers[index] = self.translate(what, result)
                    else:
                        answers[index] = result
                if not missing:
                    return answers
                for index in {calls[i][0].sha: i for i in missing}.values():
                    await client.script_load(calls[index][0].source)
                todo = missing
        for index in todo:
            answers[index] = self.unavailable(what, "the server keeps forgetting its scripts")
        return answers
