"""``stepsource worker MODULE:ENGINE``: run an engine's registered steps in this process.

The module is imported (registering its steps), the named Engine's URL and worker count are
overridden from the command line, and the process runs until SIGTERM or SIGINT: then it stops
leasing, cancels in-flight handlers (they resume elsewhere by replay), releases their leases
and exits 0.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import anyio

from stepsource.engine.engine import Engine
from stepsource.errors import UsageError

__all__ = ["load_engine", "run_worker"]

_logger = logging.getLogger("stepsource.worker")


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
    engine = getattr(module, attribute, None)
    if not isinstance(engine, Engine):
        raise UsageError(f"{target!r} is not a stepsource Engine (found {type(engine).__name__})")
    return engine


async def run_worker(
    target: str, *, url: str | None, workers: int | None, lease_seconds: float | None
) -> int:
    base = load_engine(target)
    engine = base.derive(url=url, workers=workers, lease_seconds=lease_seconds)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with engine:
            print(  # one line a supervisor (or a test) can wait for
                f"stepsource worker {engine.worker_id} running {len(engine.step_ids())} steps "
                f"with {engine.workers} workers",
                flush=True,
            )
            async for signum in signals:
                _logger.info("received signal %s: stopping", signum)
                break
    return 0
