"""`stepsource worker MODULE:ENGINE`: run an engine's registered steps in this process.

The module is imported (registering its steps), the named Engine's URL and worker count are
overridden from the command line, and the process runs until SIGTERM or SIGINT: then it stops
leasing, cancels in-flight handlers (they resume elsewhere by replay), releases their leases
and exits 0. A handler or ``ctx.do`` body running in a thread cannot be interrupted: the stop
waits for it to return, saying every :data:`STOP_REPORT_SECONDS` which executions it waits
for; a second SIGTERM or SIGINT exits at once (status 128 + the signal), as a crash would:
those executions resume on another worker once their leases lapse.

Logs go to stderr at --log-level (INFO by default: a line per execution start, end, retry and
takeover from the `stepsource.worker` logger, `ctx.log` lines from `stepsource.step`, and
warnings when the backend fails or answers again), as text or, with --log-format json, one
JSON object per line with the bound ids as fields.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson

from stepsource.aggregates.values import with_article
from stepsource.engine.engine import Engine
from stepsource.engine.interceptors import Interceptor
from stepsource.errors import StepsourceError, UsageError
from stepsource.stop_report import STOP_REPORT_SECONDS, executions_text
from stepsource.ui_cli import cannot_listen

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "load_engine", "run_worker"]

_logger = logging.getLogger("stepsource.worker")


#: record attributes a stepsource log line may bind (see stepsource.engine.worklog, ctx.log)
BOUND = (
    "event",
    "execution_id",
    "step_id",
    "attempt",
    "worker_id",
    "previous_worker_id",
    "error_type",
    "metadata",
)


def _bound(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in BOUND if hasattr(record, name)}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, and for `ctx.log` lines the execution's ids after it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "stepsource.step" and hasattr(record, "execution_id"):
            bound = _bound(record)
            metadata = bound.pop("metadata", None) or {}
            pairs = {**bound, **metadata} if isinstance(metadata, dict) else bound
            text += " [" + " ".join(f"{k}={v}" for k, v in pairs.items()) + "]"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the bound ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_bound(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=repr).decode()


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send stepsource's log lines (and the app's) to stderr at ``level`` as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def load_engine(target: str) -> Engine:
    """Import ``module:attribute`` and return the Engine it names."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(
            f"{target!r} is not MODULE:ENGINE",
            hint="For example: stepsource worker myapp.steps:engine",
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"cannot import {module_name!r}: {error}") from None
    except StepsourceError:
        raise  # a registration the engine refused at import: its own message
    except Exception as error:  # noqa: BLE001 - the app's own import-time failure, reworded
        raise UsageError(
            f"importing {target!r} failed: {type(error).__name__}: {error}",
            hint="The module must import cleanly and define a stepsource Engine",
        ) from None
    engine = getattr(module, attribute, None)
    if not isinstance(engine, Engine):
        found = (
            f"{module_name} has no {attribute!r}"
            if not hasattr(module, attribute)
            else f"found {with_article(type(engine).__name__)}"
        )
        engines = sorted(name for name, value in vars(module).items() if isinstance(value, Engine))
        raise UsageError(
            f"{target!r} is not a stepsource Engine ({found})",
            hint=f"The Engines in {module_name}: {', '.join(engines)}"
            if engines
            else f"{module_name} defines no Engine at its top level; name the module that does",
        )
    return engine


def _observability(
    metrics_port: int | None, metrics_host: str, present: Sequence[Interceptor] = ()
) -> tuple[list[Interceptor], Any]:
    """Tracing when the ``otel`` extra is installed (configured by the standard ``OTEL_*``
    variables unless ``opentelemetry-instrument`` configured it), and Prometheus metrics
    served on ``metrics_port`` when one is given (the metrics interceptor, or None): the
    interceptors to add to the engine's own (``present``), which may trace or count already
    (then those are used, not doubled)."""
    interceptors: list[Interceptor] = []
    metrics = None
    try:
        from stepsource.otel import TracingInterceptor, configure_from_environment
    except ImportError:
        _logger.debug("the otel extra is not installed: no tracing")
    else:
        configure_from_environment()
        if not any(isinstance(each, TracingInterceptor) for each in present):
            interceptors.append(TracingInterceptor())
    if metrics_port is not None:
        try:
            from stepsource.metrics import MetricsInterceptor, serve_metrics
        except ImportError as error:
            raise UsageError(
                "--metrics-port needs prometheus-client", hint="pip install 'stepsource[otel]'"
            ) from error
        metrics = next((m for m in present if isinstance(m, MetricsInterceptor)), None)
        if metrics is None:
            metrics = MetricsInterceptor()
            interceptors.append(metrics)
        try:
            serve_metrics(metrics_port, metrics_host, metrics.registry)
        except OSError as error:
            raise cannot_listen("--metrics-port", metrics_host, metrics_port, error) from None
    return interceptors, metrics


async def run_worker(
    target: str,
    *,
    url: str | None,
    workers: int | None,
    lease_seconds: float | None,
    log_level: str = "INFO",
    log_format: str = "text",
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> int:
    if workers is not None and workers < 1:
        raise UsageError(
            f"--workers {workers}: a worker must run at least one execution at a time",
            hint="Use --workers 1 or more; a process that only starts and queries executions "
            "needs no worker (Engine(url, workers=0))",
        )
    base = load_engine(target)
    observers, metrics = _observability(metrics_port, metrics_host, base.interceptors)
    engine = base.derive(
        url=url,
        workers=workers,
        lease_seconds=lease_seconds,
        interceptors=(*base.interceptors, *observers),
    )
    if engine.workers < 1:
        raise UsageError(
            f"{target} is an Engine with workers=0: this worker would run nothing",
            hint="Pass --workers N (N >= 1)",
        )
    if not engine.step_ids():
        raise UsageError(
            f"{target} registers no steps: this worker would run nothing",
            hint="Register steps with @engine.step(...) in the module before starting a worker",
        )
    configure_logging(log_level, log_format)
    stopping = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as watcher:
            watcher.start_soon(_watch_signals, signals, stopping, engine)
            await _serve(engine, metrics, stopping)
            watcher.cancel_scope.cancel()
    return 0


async def _serve(engine: Engine, metrics: Any, stopping: anyio.Event) -> None:
    """Run ``engine``'s workers (and the queue-depth sampler) until ``stopping`` is set."""
    async with engine, anyio.create_task_group() as tasks:
        if metrics is not None:
            from stepsource.metrics import sample_queue_depth

            tasks.start_soon(
                sample_queue_depth,
                metrics,
                engine.store.backend,
                engine.step_ids(),
                engine.clock,
            )
        print(  # one line a supervisor (or a test) can wait for
            f"stepsource worker {engine.worker_id} running {len(engine.step_ids())} steps "
            f"with {engine.workers} workers",
            flush=True,
        )
        await stopping.wait()
        tasks.cancel_scope.cancel()


async def _watch_signals(
    signals: AsyncIterator[int], stopping: anyio.Event, engine: Engine
) -> None:
    """The first signal stops the worker; while the stop waits for executions whose handler
    or body has not returned, say which; a second signal exits the process at once."""
    async for signum in signals:
        _logger.info("received signal %s: stopping", signum)
        stopping.set()
        break
    while True:
        with anyio.move_on_after(STOP_REPORT_SECONDS):
            async for signum in signals:
                _logger.warning(
                    "received signal %s again: exiting now, without waiting for %s (each "
                    "resumes on another worker once its lease lapses)",
                    signum,
                    executions_text(engine.live_executions()),
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(128 + signum)  # threads running bodies cannot be joined or stopped
        live = engine.live_executions()
        if live:
            _logger.warning(
                "still stopping: waiting for the handler or ctx.do body of %s to return (a "
                "thread cannot be interrupted); send SIGTERM or SIGINT again to exit now",
                executions_text(live),
            )
