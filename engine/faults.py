"""Test-only fault injection: kill this process at a named point, as a power cut would.

Set ``STEPSOURCE_TEST_KILL_AT`` to a point name (optionally ``name:N`` to die the N-th time
the point is reached, counting from 1). Both variables are read once, when this module is
imported (the processes under test are started with them set); a test arming them inside
its own process sets :data:`kill_at` or :data:`journal_path` instead. Unset, a hook costs one
global lookup. Points:

- ``before-first-append``: the execution is leased, nothing of this run is recorded yet
- ``after-substep-body``: a ``ctx.do`` body finished, its result is not recorded yet
- ``after-record``: a commit of the attempt was just made durable
- ``inside-wait``: the execution recorded its suspension and holds no lease
- ``readmodel-batch``: inside a read-model batch's transaction, before it commits
- ``after-transaction``: a transactional step's transaction (its rows and record) committed
- ``after-successor``: ``ctx.continue_as_new`` started the successor, its end is not recorded

``STEPSOURCE_TEST_JOURNAL=<path>`` makes every commit append two lines to that file (each line
written and flushed at once): ``attempt <stream> <first> <last> <topics>`` before the append
and ``ack <stream> <first> <last> <topics>`` once it is durable (the topics tell apart two
commits of one execution at the same versions in flight at once: a zombie's and its
successor's) — what a Jepsen-style checker compares with the log after a kill loop.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "journal", "journaling", "kill_point"]

POINTS = frozenset(
    {
        "before-first-append",
        "after-substep-body",
        "after-record",
        "inside-wait",
        "readmodel-batch",
        "after-transaction",
        "after-successor",
    }
)
_ENV = "STEPSOURCE_TEST_KILL_AT"
_JOURNAL_ENV = "STEPSOURCE_TEST_JOURNAL"
_seen: dict[str, int] = {}

#: ``STEPSOURCE_TEST_KILL_AT`` as this process started with it
kill_at: str | None = os.environ.get(_ENV) or None
#: ``STEPSOURCE_TEST_JOURNAL`` as this process started with it
journal_path: str | None = os.environ.get(_JOURNAL_ENV) or None


def kill_point(name: str) -> None:
    """SIGKILL this process if ``STEPSOURCE_TEST_KILL_AT`` names this point (and count)."""
    target = kill_at
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def journaling() -> bool:
    """Whether ``STEPSOURCE_TEST_JOURNAL`` is set (callers skip building journal lines if not)."""
    return bool(journal_path)


def journal(kind: str, stream_id: str, first: int, last: int, topics: str = "") -> None:
    """Append one line to ``STEPSOURCE_TEST_JOURNAL`` if set (tests only)."""
    path = journal_path
    if not path:
        return
    line = f"{kind} {stream_id} {first} {last} {topics}".rstrip() + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)
