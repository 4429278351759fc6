"""Python's cyclic garbage collector while a worker pool runs executions.

Every execution a worker runs allocates thousands of short-lived objects (events, their
values, tasks, cancel scopes). With CPython's default threshold (a collection of the youngest
generation every 700 net allocations, a full collection every hundred of those) a worker
running 50 empty executions at once spends about a sixth of its time in the collector, most
of it in full collections that walk everything alive. While a pool runs, the youngest
generation's threshold is raised to :data:`WORKER_THRESHOLD` (never lowered: a process that
set a higher one keeps it), which makes young collections rarer and full ones rarer still;
reference counting frees everything that is not in a cycle at once, as before. A catch-up of
the executions index (a rebuild of the whole log, in a client engine too) raises it the same
way while it folds: each page of the log is thousands of short-lived tuples. The previous
thresholds come back when the last pool or fold of the process stops.
``Engine(gc_threshold=None)`` leaves the collector alone.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["WORKER_THRESHOLD", "tuned_collector"]

#: the youngest generation's collection threshold while a worker pool runs
WORKER_THRESHOLD = 10_000

_lock = threading.Lock()
_pools = 0
_saved: tuple[int, int, int] | None = None
_ours: tuple[int, int, int] | None = None


@contextlib.contextmanager
def tuned_collector(threshold: int | None) -> Iterator[None]:
    """Raise the collector's youngest threshold to ``threshold`` (None: leave it) while the
    block runs; several pools at once share one raise."""
    global _pools, _saved, _ours
    if threshold is None:
        yield
        return
    with _lock:
        _pools += 1
        if _pools == 1:
            current = gc.get_threshold()
            _saved = (current[0], current[1], current[2])
            if current[0] and current[0] < threshold:  # 0: the collector is off, stay off
                _ours = (threshold, current[1], current[2])
                gc.set_threshold(*_ours)
            else:
                _ours = None
    try:
        yield
    finally:
        with _lock:
            _pools -= 1
            if _pools == 0:
                # put back only what this module set: a change made meanwhile stays
                if _ours is not None and _saved is not None and gc.get_threshold() == _ours:
                    gc.set_threshold(*_saved)
                _saved = _ours = None
