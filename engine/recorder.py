"""The recorder below StepContext: coordinates, matching against the log, and commits.

One :class:`Recorder` serves one run of a handler (a live attempt, a resumed one, a verify or
a query replay). Every recording operation of the context and of the features built on it
(waits, children, global state, DAG flows) goes through its public methods:

- :meth:`Recorder.op` gives the operation its coordinates ``(attempt, scope, seq, version)``:
  the enclosing ``ctx.do`` name and the operation's ordinal there. Operations from concurrent
  tasks in one scope are refused (replay could not match them).
- :meth:`Recorder.match` looks the coordinates up in what the attempt already recorded (the
  :class:`~stepsource.engine.replay.ReplayCursor`): the recorded event, None to go live, or a
  NonDeterminismError naming both sides.
- :meth:`Recorder.record` follows every deterministic operation (state, checkpoints): under
  ``durability="boundary"`` (the default) its event stays buffered, in order, until the next
  boundary; under ``"each"`` it is committed at once. The buffer is also committed when it
  passes a bound (:data:`MAX_BUFFERED_EVENTS` events, or bytes that leave room for the largest
  event under the backend's commit limit), and the handler yields to the event loop every
  :data:`YIELD_EVERY` buffered operations so renewals and other executions run.
- :meth:`Recorder.commit` makes every pending event of the aggregate durable, guarded by the
  stream's version and this worker's lease, sharing the backend's group commit. It is the
  boundary: a ``ctx.do`` result, every value from outside the handler, waits, child starts,
  the end of an attempt. A commit is shielded from cancellation, so the aggregate in memory is
  never left ahead of the log by a timeout or a lost lease; one refused midway leaves the
  recorder *in doubt* and the actor reloads the aggregate before recording the outcome.
- :meth:`Recorder.check_lease` stops an actor whose lease lapsed (by its own clock) before it
  runs a side effect, so a zombie does no work another worker will do again.

It also holds the message handlers a handler registers (``ctx.on_signal`` and the like), which
the waits deliver to.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from stepsource.adapters.ports import Outgoing, QueueUpdate
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import OpCoordinates, StepExecution
from stepsource.engine import commit_grace
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.failures import Unwinding
from stepsource.engine.faults import kill_point
from stepsource.engine.interceptors import CommitInfo, hooked, intercept
from stepsource.engine.replay import ReplayCursor
from stepsource.engine.runtime import Runtime
from stepsource.engine.scope import SCOPE
from stepsource.engine.services import ServiceRegistry
from stepsource.engine.store import PreparedCommit
from stepsource.errors import (
    BackendUnavailableError,
    NonDeterminismError,
    StepsourceError,
    UsageError,
    VersionConflictError,
)

__all__ = [
    "ENDED",
    "MAX_BUFFERED_EVENTS",
    "YIELD_EVERY",
    "HistoryNeeded",
    "InterceptorFailed",
    "Recorder",
    "current_task",
    "terminal_outbox",
]

#: why a caller in :attr:`Recorder.reading` may not record, and what to do instead
READ_ONLY_HINTS = {
    "a query handler": "Change state from a signal or update handler instead",
    "a wait_for_condition predicate": "Record before or after the wait, or in the signal or "
    "update handler that changes what the predicate reads; the predicate only says whether "
    "to go on",
}

#: the events that end an execution
ENDED = (ev.StepCompleted, ev.StepFailed, ev.StepCancelled)

#: a buffer of this many events is committed without waiting for a boundary
MAX_BUFFERED_EVENTS = 1000

#: a handler recording buffered operations yields to the event loop this often
YIELD_EVERY = 64


class InterceptorFailed(Unwinding):
    """A commit interceptor raised (``error``): raised through the handler, which cannot take
    it for a failure of its own; the attempt ends there, unrecorded, and the worker logs
    ``error`` (the execution runs again after a lease period, on from what is durable)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"a commit interceptor raised {type(error).__name__}: {error}")
        self.error = error


class HistoryNeeded(Unwinding):
    """Unwinds a handler that reads ``ctx.history`` in a run that started from a snapshot:
    the actor reads the older events and runs the handler again from the top, as a resume."""


def current_task() -> object:
    """The running task object (asyncio's, else trio's): cheaper than anyio's TaskInfo."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread: trio runs this task
        import trio.lowlevel

        return trio.lowlevel.current_task()


class Recorder:
    """The live state of one run of a handler: aggregate, replay cursor, coordinates, commits."""

    def __init__(
        self,
        runtime: Runtime,
        definition: StepDefinition,
        aggregate: StepExecution,
        replay_cursor: ReplayCursor,
        applied: list[ev.ExecutionEvent],
        *,
        history_from: int = 1,
        resumed: bool = False,
        taken_over: bool = False,
    ) -> None:
        self.runtime = runtime
        #: this run replays an attempt begun before it (a wake-up, a takeover)
        self.resumed = resumed
        #: the worker that ran the attempt before was lost with it running: the first body to
        #: run here may have run there too
        self.taken_over = taken_over
        #: a ctx.do body ran live in this run
        self.ran_a_body = False
        self.definition = definition
        self.aggregate = aggregate
        self.replay = replay_cursor
        self._applied = replay_cursor.applied
        self._applied[:0] = applied
        #: the version of the first event in :attr:`applied`: above 1 when the run started
        #: from a snapshot, and ``ctx.history`` then needs the older events (HistoryNeeded)
        self.history_from = history_from
        self._lock = anyio.Lock(fast_acquire=True)  # uncontended on the hot path: no checkpoint
        self._durable_version = aggregate.version - len(aggregate.pending_events)
        self.services: ServiceRegistry = runtime.services
        self.worker_id = runtime.worker_id
        self._seq: dict[str, int] = {}
        self._scope_tasks: dict[str, object] = {}
        self._scope_first_op: dict[str, str] = {}
        #: who runs now that reads and never records (a query handler, a wait_for_condition
        #: predicate: neither runs again on replay), else None; a recording operation refused
        self.reading: str | None = None
        #: message handlers the handler registered (``ctx.on_signal`` and the like)
        self.signal_handlers: dict[str, Callable[..., Any]] = {}
        self.query_handlers: dict[str, Callable[..., Any]] = {}
        self.update_handlers: dict[str, Callable[..., Any]] = {}
        self.each = (definition.durability or runtime.durability) == "each"
        limits = runtime.store.limits
        max_commit = runtime.store.backend.max_commit_bytes
        #: buffered bytes that trigger a commit: room is left for the largest event
        self.byte_bound = max(max_commit - limits.max_payload_bytes, limits.max_payload_bytes)
        self._since_yield = 0
        #: a commit failed midway: the aggregate may be ahead of the log (see :meth:`reload`)
        self.in_doubt = False
        #: why this attempt fails without running the handler (its input gives no
        #: concurrency key), or None
        self.unfit: StepsourceError | None = None

    @property
    def applied(self) -> list[ev.ExecutionEvent]:
        """Events folded into the aggregate so far (recorded or replayed), in order."""
        return self._applied

    @property
    def execution_id(self) -> str:
        return self.aggregate.execution_id

    @property
    def step_id(self) -> str:
        return self.aggregate.step_id

    def where(self) -> dict[str, Any]:
        """The execution and step, as the keyword arguments of a StepsourceError."""
        return {"execution_id": self.aggregate.execution_id, "step_id": self.aggregate.step_id}

    def now(self) -> datetime:
        return self.runtime.clock.now()

    # -- coordinates and matching -------------------------------------------------------------
    def op(self, name: str) -> OpCoordinates:
        """The coordinates of the next recording operation ``name`` in the current scope."""
        observer = self.runtime.on_operation
        if observer is not None:
            observer(self.aggregate.execution_id, name)
        if self.reading is not None:
            raise UsageError(
                f"{name} was called by {self.reading}, which reads and never records "
                "(it is not run again when the execution replays)",
                hint=READ_ONLY_HINTS[self.reading],
                **self.where(),
            )
        scope = SCOPE.get()
        task = current_task()
        owner = self._scope_tasks.setdefault(scope, task)
        first = self._scope_first_op.setdefault(scope, name)
        if task != owner:
            where = f"inside ctx.do({scope!r})" if scope else "outside ctx.do"
            raise UsageError(
                f"{name} was called from a concurrent task {where} (another task, such as a "
                f"child task of the handler, called {first} there first)",
                hint="Run each concurrent branch in its own ctx.do(name, fn) so replay can "
                "match its operations",
                **self.where(),
            )
        seq = self._seq.get(scope, 0)
        self._seq[scope] = seq + 1
        return (self.aggregate.next_attempt_number(), scope, seq, self.definition.version)

    def hand_back_scopes(self) -> None:
        """Forget which task owns each scope: the task that served a plain ``def`` handler's
        operations has ended, and the actor records the outcome from its own."""
        self._scope_tasks.clear()

    def closing_op(self, scope: str) -> OpCoordinates:
        """Coordinates of an outcome recorded at the end of ``scope`` (a ``ctx.do`` result):
        matched by name, not by ordinal."""
        return (self.aggregate.next_attempt_number(), scope, -1, self.definition.version)

    def match(
        self, op: OpCoordinates, attempted: str, expected: type[ev.Recorded], identity: object
    ) -> ev.Recorded | None:
        """The event recorded at ``op`` (the operation replays), None (it runs live), or
        NonDeterminismError if the record holds another operation there."""
        return self.replay.match(op[1], op[2], attempted, expected, identity)

    def mismatch(self, attempted: str, recorded: ev.ExecutionEvent) -> NonDeterminismError:
        return self.replay.mismatch(attempted, recorded)

    # -- commits --------------------------------------------------------------------------------
    async def record(self) -> None:
        """A deterministic operation was recorded: commit it now under ``"each"`` or when the
        buffer passes its bound; otherwise leave it buffered until the next boundary."""
        aggregate = self.aggregate
        if (
            self.each
            or len(aggregate.pending_events) >= MAX_BUFFERED_EVENTS
            or aggregate.pending_bytes >= self.byte_bound
        ):
            self._since_yield = 0
            await self.commit()
            return
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            await anyio.lowlevel.checkpoint()

    def check_lease(self, before: str) -> None:
        """Raise VersionConflictError if this worker's lease lapsed (by its own clock): the
        side effect ``before`` names must not run, another worker may be running it."""
        deadline = self.runtime.lease_deadlines.get(self.aggregate.execution_id)
        if deadline is None or self.runtime.clock.now_ms() < deadline:
            return
        raise VersionConflictError(
            f"this worker's lease lapsed before {before} could run (renewals did not get "
            "through in time); the worker stops and the execution resumes elsewhere",
            hint="Keep the event loop free (run blocking code in ctx.do with a sync body) or "
            "raise lease_seconds",
            **self.where(),
        )

    async def reload(self) -> None:
        """Read the aggregate back from the log after a commit failed midway (in doubt)."""
        aggregate, _ = await self.runtime.store.load(self.aggregate.execution_id)
        self.aggregate = aggregate
        self._durable_version = aggregate.version
        self.in_doubt = False

    async def commit(
        self,
        *,
        final: bool = False,
        queue: QueueUpdate | None = None,
        consumed: Sequence[int] = (),
        forward: Sequence[Outgoing] = (),
    ) -> None:
        """Make every pending event durable; return once this caller's events are.
        ``forward``: inbox items posted elsewhere in the same commit (a final one)."""
        target = self.aggregate.version
        try:
            self._lock.acquire_nowait()  # uncontended, the usual case: no checkpoint
        except anyio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._durable_version >= target:
                return
            outbox: list[Outgoing] = []
            if final:
                queue = QueueUpdate(kind="done")
                outbox = [*await terminal_outbox(self.runtime, self.aggregate), *forward]
            if queue is not None:
                self.runtime.giving_up.add(self.aggregate.execution_id)
            interceptors = hooked(self.runtime.interceptors, "commit")
            write_errors: list[BaseException] = []
            try:
                if interceptors:
                    info = CommitInfo(
                        self.aggregate.execution_id,
                        self.aggregate.step_id,
                        len(self.aggregate.pending_events),
                    )
                    work = functools.partial(
                        self._write_noting, write_errors, queue, consumed, outbox
                    )
                    written = await intercept(interceptors, "commit", info, work)
                else:
                    written = await self._write(queue, consumed, outbox)
            except BaseException as error:
                self.in_doubt = True
                if interceptors and isinstance(error, Exception) and error not in write_errors:
                    raise InterceptorFailed(error) from error  # the interceptor's own
                raise
            self._applied.extend(written)
            self._durable_version = self.aggregate.version
        finally:
            self._lock.release()
        kill_point("after-record")
        if final:
            execution_id = self.aggregate.execution_id
            if self.runtime.on_end is not None and written and isinstance(written[-1], ENDED):
                self.runtime.on_end(execution_id, written[-1])
            self.runtime.on_change(execution_id)

    async def _write_noting(
        self,
        errors: list[BaseException],
        queue: QueueUpdate | None,
        consumed: Sequence[int],
        outbox: Sequence[Outgoing],
    ) -> list[ev.ExecutionEvent]:
        """:meth:`_write`, keeping what it raised in ``errors`` (to tell it from what the
        commit interceptors around it raise)."""
        try:
            return await self._write(queue, consumed, outbox)
        except BaseException as error:
            errors.append(error)
            raise

    async def _write(
        self, queue: QueueUpdate | None, consumed: Sequence[int], outbox: Sequence[Outgoing]
    ) -> list[ev.ExecutionEvent]:
        """Take the pending events and make them durable: at once where the backend can
        (code that never suspends cannot be cancelled midway, so it needs no shielded scope,
        whose price is about a fifth of a commit on SQLite), else awaited in the scope."""
        store = self.runtime.store
        prepared = store.prepare(
            self.aggregate,
            queue=queue,
            lease_owner=self.runtime.worker_id,
            consumed=consumed,
            outbox=outbox,
        )
        written = store.write_now(prepared)
        if written is None:
            written = await self._shielded(prepared)
        return written

    async def _shielded(self, prepared: PreparedCommit) -> list[ev.ExecutionEvent]:
        """Await the write of ``prepared`` shielded: once the events leave the buffer, the
        commit ends either way (a timeout, a lost lease or SIGTERM cancels the handler after
        it, never inside it) unless the backend hangs past the grace
        (engine/commit_grace.py): then the recorder is in doubt and the aggregate is read
        back before anything else is recorded."""
        grace = self.runtime.commit_grace
        bounded = grace.scope()
        written: list[ev.ExecutionEvent] = []
        with bounded:
            try:
                written = await self.runtime.store.write(prepared)
            finally:
                grace.closed(bounded)
        if bounded.cancelled_caught:  # the backend hung past the grace: outcome unknown
            raise BackendUnavailableError(
                f"a commit did not end within {commit_grace.COMMIT_GRACE:g} s, so whether "
                "it is stored is unknown",
                execution_id=self.aggregate.execution_id,
                step_id=self.aggregate.step_id,
                hint="The execution resumes by replay from what the log holds once the "
                "backend answers again",
            )
        return written


#: a parent ending so cancels the children still running
_ORPHANING = frozenset({"cancelled", "failed"})


async def terminal_outbox(runtime: Runtime, aggregate: StepExecution) -> list[Outgoing]:
    """What a terminal commit posts in its own transaction: a nudge to the parent (which
    reads the child's outcome from the child's log) and, when it was cancelled or failed for
    good, a cancel to every child still running (nothing waits for their results any more: a
    DAG whose required node failed stops its other nodes)."""
    now_ms = runtime.clock.now_ms()
    outbox: list[Outgoing] = []
    if aggregate.parent_execution_id:
        outbox.append(
            Outgoing(aggregate.parent_execution_id, "child", aggregate.execution_id, b"{}", now_ms)
        )
    if aggregate.status in _ORPHANING and aggregate.children:
        ended = "was cancelled" if aggregate.status == "cancelled" else "failed"
        reason = runtime.store.codec.seal(
            orjson.dumps({"reason": f"parent {aggregate.execution_id} {ended}"})
        )
        store = runtime.store
        for child_id in aggregate.children:
            last = await store.backend.stream_version(child_id)
            if last and not isinstance((await store.events(child_id, last, last))[0], ENDED):
                outbox.append(Outgoing(child_id, "cancel", "cancel", reason, now_ms))
    return outbox
