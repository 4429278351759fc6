"""Interceptors: wrap what the engine does, to trace it, measure it or log it.

An interceptor is an object with any of the methods of :class:`Interceptor` (subclass it and
override what you need). Each method receives a frozen *info* object describing what is
about to happen and ``call_next``, an async function doing the work (and the inner
interceptors' part of it); it returns what ``call_next`` returns, and may act before, after,
or on the exception it raises. ``Engine(url, interceptors=[...])`` installs them; the first
one listed is the outermost.

=============  =====================================================  ==========================
method         wraps                                                  where it runs
=============  =====================================================  ==========================
``start``      scheduling an execution (``engine.start``, a child)    the starting process
``attempt``    one run of a handler and the recording of its outcome  the worker
``substep``    a ``ctx.do`` body that runs (never one read back)      the worker
``wait``       a wait that runs live (sleep, event, condition, child) the worker
``message``    a client's signal, event, update or cancellation       the sending process
``commit``     one commit of the events a handler recorded            the worker
=============  =====================================================  ==========================

The ``attempt`` method's ``call_next`` returns an :class:`AttemptOutcome`: the execution's
status once the run's outcome is recorded (``completed``, ``failed``, ``retrying``,
``waiting`` when suspended, ``cancelled``) and how long the run spent replaying the record
before it went live.

``StartInfo.headers`` is a mutable dict of strings: what a ``start`` interceptor puts there
is stored with the execution (``StepScheduled.headers``) and handed to every attempt in
``AttemptInfo.headers`` — how a trace context travels from the starter to a worker in
another process. Operations matched from the log on replay reach no interceptor; a
``ctx.do`` body running in an attempt a worker took over from a lost one, before any other
body did, may have run there before the crash: ``SubStepInfo.rerun`` says so. A wait runs
live again when its execution wakes up, until it ends.

An interceptor must not raise for its own reasons: an exception it raises is the
operation's. A start fails (the caller gets the exception); a ``ctx.do`` body or a wait fails
like any handler error; an attempt or a commit is not recorded at all: the worker logs the
error and runs the execution again after a lease period, and the lost-worker cutoff fails it
if that repeats. An interceptor that returns without awaiting ``call_next()`` raises a
UsageError in the same way (the work would otherwise silently not happen).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stepsource.errors import UsageError

__all__ = [
    "AttemptInfo",
    "AttemptOutcome",
    "CommitInfo",
    "Interceptor",
    "MessageInfo",
    "StartInfo",
    "SubStepInfo",
    "WaitInfo",
    "check_interceptors",
    "hooked",
    "intercept",
]

T = TypeVar("T")

CallNext = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class StartInfo:
    step_id: str
    execution_id: str
    correlation_id: str | None
    #: the parent execution for a child start (``ctx.start_step``, a DAG node), else None
    parent_execution_id: str | None
    #: stored with the execution and handed to every attempt (fill it before call_next)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptInfo:
    execution_id: str
    step_id: str
    step_version: str
    attempt: int
    flow_id: str | None
    worker_id: str
    #: what the starter's interceptors stored with the execution
    headers: dict[str, str]
    #: this run replays an attempt begun earlier (a wake-up, a takeover), not a fresh one
    resumed: bool
    #: when the execution was scheduled and when this attempt was due (epoch ms)
    scheduled_ms: int
    due_ms: int


@dataclass(frozen=True)
class AttemptOutcome:
    """What an attempt's run came to (what ``call_next`` of ``attempt`` returns)."""

    #: the execution's status after it: completed, failed, retrying, waiting, cancelled...
    status: str
    #: seconds the run spent replaying recorded operations before it went live
    replay_seconds: float


@dataclass(frozen=True)
class CommitInfo:
    execution_id: str
    step_id: str
    #: how many events the commit makes durable
    events: int


@dataclass(frozen=True)
class SubStepInfo:
    execution_id: str
    step_id: str
    attempt: int
    name: str
    idempotency_key: str
    #: the first body to run in an attempt this worker took over from a lost one: it may
    #: have run there before the crash
    rerun: bool


@dataclass(frozen=True)
class WaitInfo:
    execution_id: str
    step_id: str
    attempt: int
    #: "sleep", "event", "condition" or "child"
    kind: str
    #: what is awaited (an event name, child ids; the reason shown when suspended)
    name: str
    wake_at_ms: int | None


@dataclass(frozen=True)
class MessageInfo:
    execution_id: str
    step_id: str | None
    #: "signal", "event", "update" or "cancel"
    kind: str
    name: str


class Interceptor:
    """Pass-through defaults: override the methods you need, and await ``call_next()``."""

    async def start(self, info: StartInfo, call_next: CallNext) -> Any:
        return await call_next()

    async def attempt(self, info: AttemptInfo, call_next: CallNext) -> Any:
        return await call_next()

    async def substep(self, info: SubStepInfo, call_next: CallNext) -> Any:
        return await call_next()

    async def wait(self, info: WaitInfo, call_next: CallNext) -> Any:
        return await call_next()

    async def message(self, info: MessageInfo, call_next: CallNext) -> Any:
        return await call_next()

    async def commit(self, info: CommitInfo, call_next: CallNext) -> Any:
        return await call_next()


#: what each method's call_next does, for that error
_WORK = {
    "start": "execution was not scheduled",
    "attempt": "attempt was not run",
    "substep": "ctx.do body was not run",
    "wait": "wait was not carried out",
    "message": "message was not sent",
    "commit": "commit was not made",
}
_METHODS = tuple(_WORK)


def check_interceptors(value: object) -> tuple[Interceptor, ...]:
    """``Engine(interceptors=...)``: a list (or tuple) of objects each with at least one of
    the interceptor methods, or a UsageError before anything runs (a bare object failed the
    first operation with an AttributeError, in a worker, far from the mistake)."""
    if isinstance(value, Interceptor) or not isinstance(value, list | tuple):
        raise UsageError(
            f"interceptors must be a list of interceptors, not {type(value).__name__}",
            hint="Pass a list, even of one: Engine(url, interceptors=[Tracing()])",
        )
    for index, interceptor in enumerate(value):
        if not any(callable(getattr(interceptor, m, None)) for m in _METHODS):
            raise UsageError(
                f"interceptors[{index}] is {type(interceptor).__qualname__}, which has none of "
                f"the interceptor methods ({', '.join(_METHODS)})",
                hint="Subclass ss.Interceptor and override the methods you need",
            )
    return tuple(value)


def hooked(interceptors: Sequence[Interceptor], method: str) -> tuple[Interceptor, ...]:
    """The interceptors among ``interceptors`` that override ``method``, in order: the others
    would only pass the call through, and a call through each is a coroutine per operation."""
    if not interceptors:
        return ()
    return tuple(
        i
        for i in interceptors
        if getattr(type(i), method, None) not in (None, getattr(Interceptor, method))
        or method in getattr(i, "__dict__", ())
    )


async def intercept(
    interceptors: Sequence[Interceptor],
    method: str,
    info: object,
    work: Callable[[], Awaitable[T]],
) -> T:
    """Run ``work`` inside every interceptor's ``method``, the first one outermost. Callers
    pass :func:`hooked`'s chain, computed once per operation (it also tells them whether an
    info object is needed at all)."""
    reached = False

    def innermost() -> Awaitable[T]:  # the work's coroutine itself: no frame of its own
        nonlocal reached
        reached = True
        return work()

    call: CallNext = innermost
    for interceptor in reversed(interceptors):
        call = functools.partial(getattr(interceptor, method), info, call)
    result: T = await call()
    if not reached:
        raise _skipped(interceptors, method)
    return result


def _skipped(interceptors: Sequence[Interceptor], method: str) -> UsageError:
    """The error for a chain that returned without doing the work: nothing was scheduled,
    run, committed or awaited, and the engine must not go on as if it had been."""
    names = [f"{type(i).__qualname__}.{method}()" for i in interceptors]
    which = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
    return UsageError(
        f"{which} returned without awaiting call_next(): the {_WORK[method]}",
        hint="An interceptor observes the work: await call_next() exactly once and return "
        "what it returns (re-raise what it raises)",
    )
