"""The event-loop watchdog of a worker pool: it notices a loop that stops making progress.

Every lease renewal, every other execution and every timer of a worker share its event
loop. Code that blocks the loop (a blocking call in an ``async def`` handler, a CPU-bound
loop between two awaits) delays them all; past the lease, another worker takes the
execution over. Sync ``ctx.do`` bodies run in threads for that reason (:mod:`.bodies`);
the watchdog finds what remains. A task on the loop stamps a heartbeat every
:func:`interval` seconds; a watcher thread checks it, and when the heartbeat is older than a
third of the lease (one renewal period) it logs one warning per stall on
``stepsource.worker``, *while the loop is still stuck*: how long it has been stuck, the
executions this pool was running, and the code the loop's thread is executing at that
moment (file, line, function). It only reports: nothing is cancelled or retried because of
it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Collection

import anyio

__all__ = ["interval", "watch_event_loop"]

_logger = logging.getLogger("stepsource.worker")

#: executions named in one warning
_NAMED = 5


def interval(lease_ms: int) -> float:
    """How often the heartbeat is stamped and checked: a sixth of the lease, at most 1 s."""
    return min(1.0, lease_ms / 6000)


def _where(thread_id: int) -> str:
    """The innermost frame the thread is executing, as file:line in function."""
    frame = sys._current_frames().get(thread_id)  # noqa: SLF001 - the documented way
    if frame is None:
        return "unknown code"
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class _Watcher:
    def __init__(
        self,
        lease_ms: int,
        running: Callable[[], Collection[str]],
        on_stall: Callable[[float], None] | None = None,
    ) -> None:
        self.every = interval(lease_ms)
        self.threshold = lease_ms / 3000
        self.running = running
        self.on_stall = on_stall
        self.beat = time.monotonic()
        self.loop_thread = threading.get_ident()
        self.stop = threading.Event()

    def watch(self) -> None:
        reported = False
        while not self.stop.wait(self.every):
            now = time.monotonic()
            stuck = now - self.beat
            if stuck > 1.5 * self.every and self.on_stall is not None:
                self.on_stall(now)  # stuck, if briefly: told while it lasts (engine/outages.py)
            if stuck <= self.threshold:
                reported = False
                continue
            if reported:
                continue
            reported = True
            try:
                names = sorted(self.running())
            except RuntimeError:  # the loop moved on while we read: it is not stuck
                continue
            shown = ", ".join(names[:_NAMED]) + (" ..." if len(names) > _NAMED else "")
            _logger.warning(
                "the event loop has made no progress for %.1f s (lease renewals are due "
                "every %.1f s); executions running: %s; the loop is in %s. Blocking code in "
                "an async handler stops every execution of this worker: move it into a sync "
                "ctx.do body, which runs in a thread",
                stuck,
                self.threshold,
                shown or "none",
                _where(self.loop_thread),
            )


async def watch_event_loop(
    lease_ms: int,
    running: Callable[[], Collection[str]],
    on_stall: Callable[[float], None] | None = None,
) -> None:
    """Stamp the heartbeat until cancelled; a watcher thread warns about stalls.
    ``running`` gives the executions running on this pool; ``on_stall`` is told, from the
    thread, each time the loop is seen stuck for more than one and a half heartbeats."""
    watcher = _Watcher(lease_ms, running, on_stall)
    thread = threading.Thread(target=watcher.watch, name="stepsource-watchdog", daemon=True)
    thread.start()
    try:
        while True:
            watcher.beat = time.monotonic()
            await anyio.sleep(watcher.every)
    finally:
        watcher.stop.set()
