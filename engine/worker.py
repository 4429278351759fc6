"""The worker pool: leases runnable executions and runs one actor per live execution.

The pool lives in a task group owned by the Engine's ``async with``. It leases only steps
registered on this engine, keeps at most ``slots`` executions running, renews their leases
(heartbeats live in the lease store, not in the log) and cancels an actor whose lease was
lost. On shutdown in-flight handlers are cancelled and their leases released, so another
worker resumes them by replay at once.

An execution started in this process can skip the queue (a *local start*): the starter
takes a free slot (:meth:`~WorkerPool.reserve`), commits StepScheduled, StepLeased and
StepStarted with the queue row already leased to this worker, and hands the aggregate to
:meth:`~WorkerPool.adopt`, which runs the handler at once (no lease poll, no load).
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress

import anyio
from anyio.abc import TaskGroup

from stepsource.adapters.ports import Backend, Lease
from stepsource.aggregates.events import ExecutionEvent
from stepsource.aggregates.execution import StepExecution
from stepsource.engine.actor import NEVER_MS, run_leased
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
from stepsource.engine.flowcontrol import renew_slots
from stepsource.engine.handover import hand_over
from stepsource.engine.notify import Notifier
from stepsource.engine.runtime import Runtime
from stepsource.engine.trim import release_free_memory
from stepsource.engine.watchdog import watch_event_loop
from stepsource.errors import BackendUnavailableError

__all__ = ["WorkerPool"]


#: after this many actors ended since the last trim, a pool idle for a whole poll interval
#: gives freed memory back (never between one execution and the next of a steady stream:
#: the collection is a pause of the event loop)
TRIM_AFTER = 1000


class _Again(Exception):
    """Lease again at once (every slot filled, or the test clock jumped)."""


_logger = logging.getLogger("stepsource.worker")


class WorkerPool:
    def __init__(
        self,
        runtime: Runtime,
        *,
        slots: int,
        poll_interval: float,
        wake: Notifier,
        gc_threshold: int | None = WORKER_THRESHOLD,
    ) -> None:
        self.runtime = runtime
        self.gc_threshold = gc_threshold
        self.slots = slots
        self.poll_interval = poll_interval
        self.wake = wake
        self.active: dict[str, anyio.CancelScope] = {}
        #: set when the actor running each stream has ended (see :meth:`_launch`)
        self.ended: dict[str, anyio.Event] = {}
        self.reserved = 0  # slots taken by local starts whose commit is in flight
        #: work may wait in the queue for a slot: the lease loop was woken (a notification, a
        #: poll) while every slot was taken, or its last lease filled every free slot. An
        #: actor's end then leases again at once; otherwise the queue was found drained and
        #: the next notification or poll finds new work, so the end costs no lease call.
        self.backlog = True
        self.ended_since_trim = 0
        self.last_ended = 0.0  # time.monotonic() when an actor last ended
        self._group: TaskGroup | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with tuned_collector(self.gc_threshold):
                async with anyio.create_task_group() as tg:
                    self._group = tg
                    tg.start_soon(self._renew_loop)
                    tg.start_soon(self.runtime.commit_grace.watch)
                    tg.start_soon(
                        watch_event_loop,
                        self.runtime.lease_ms,
                        self.active.keys,
                        self.runtime.contact.stalled,
                    )
                    task_status.started()
                    await self._lease_loop(tg)
        finally:
            self._group = None

    def reserve(self, step_id: str) -> bool:
        """Take a free slot for a local start of ``step_id``; False if none is free (or this
        pool does not run the step, or is stopping): then the start goes through the queue."""
        if self._group is None or step_id not in self.runtime.definitions:
            return False
        if step_id in self.runtime.flow_limits:  # its slot is taken once leased
            return False
        if len(self.active) + self.reserved >= self.slots:
            return False
        self.reserved += 1
        return True

    def unreserve(self) -> None:
        """Give back a reserved slot whose start was not committed."""
        self.reserved -= 1
        self.wake.notify()

    def adopt(self, lease: Lease, aggregate: StepExecution, events: list[ExecutionEvent]) -> bool:
        """Run a locally started execution in its reserved slot; False if the pool stopped
        meanwhile (the caller then releases the lease)."""
        self.reserved -= 1
        if self._group is None:
            return False
        self._launch(self._group, lease, (aggregate, events))
        return True

    def _launch(
        self,
        group: TaskGroup,
        lease: Lease,
        started: tuple[StepExecution, list[ExecutionEvent]] | None = None,
    ) -> None:
        """Run an actor for ``lease``. If this pool still runs that execution (its lease
        lapsed unseen while renewals failed, and the backend leased it to this worker again),
        the earlier actor is stopped and the new one starts once it has ended: never two
        actors of one execution at once (they share this worker's id, so the backend's lease
        check cannot tell them apart)."""
        stream = lease.stream_id
        earlier = self.active.get(stream)
        if earlier is not None:
            earlier.cancel()
        scope = anyio.CancelScope()
        self.active[stream] = scope
        self.runtime.lease_deadlines[stream] = lease.expires_ms
        after = self.ended.get(stream)
        ended = self.ended[stream] = anyio.Event()
        group.start_soon(self._run_one, lease, scope, started, after, ended)

    async def _lease_loop(self, tg: TaskGroup) -> None:
        backend = self.runtime.store.backend
        step_ids = sorted(self.runtime.definitions)
        failures = 0
        while True:
            try:
                await self._lease_some(tg, backend, step_ids)
                if failures:
                    _logger.warning("the backend answers again after %d failed tries", failures)
                failures = 0
            except _Again:
                continue
            except BackendUnavailableError as error:
                self.runtime.contact.failed(self.runtime.clock.now_ms())
                failures += 1
                delay = min(self.poll_interval * 2**failures, 5.0)
                _logger.warning("the backend is unavailable (%s); retrying in %.1f s", error, delay)
                await anyio.sleep(delay)
                continue
            self._trim_if_idle()
            await self.wake.wait(self.poll_interval)

    def _trim_if_idle(self) -> None:
        """After a burst (TRIM_AFTER actors ended), once nothing has run for a whole poll
        interval: its freed memory goes back to the OS instead of staying at the peak."""
        if (
            self.ended_since_trim >= TRIM_AFTER
            and not self.active
            and not self.reserved
            and time.monotonic() - self.last_ended >= self.poll_interval
        ):
            self.ended_since_trim = 0
            release_free_memory()

    async def _lease_some(self, tg: TaskGroup, backend: Backend, step_ids: list[str]) -> None:
        """Lease what fits in the free slots; raise _Again to lease again at once."""
        free = self.slots - len(self.active) - self.reserved
        if free <= 0:
            self.backlog = True  # woken with no slot to fill: what woke it waits
            return
        if not step_ids:
            return
        now_ms = self.runtime.clock.now_ms()
        began = time.monotonic()
        notices = self.wake.count
        leases = await backend.lease(
            self.runtime.worker_id, step_ids, now_ms, self.runtime.lease_ms, free
        )
        self._answered(began)
        for lease in leases:
            self._launch(tg, lease)
        # lease again at once if every free slot was filled (more may wait) or a notice came
        # during the call (what it announced may be newer than what the call saw)
        if (leases and len(leases) == free) or self.wake.count != notices:
            raise _Again
        self.backlog = False  # the queue was found drained
        if not leases and not self.active and self.runtime.clock.skips_idle_time:
            due = await backend.next_due_ms(step_ids)
            if due is not None and self.runtime.clock.now_ms() < due < NEVER_MS:
                self.runtime.clock.advance_to_ms(due)
                raise _Again

    async def _run_one(
        self,
        lease: Lease,
        scope: anyio.CancelScope,
        started: tuple[StepExecution, list[ExecutionEvent]] | None,
        after: anyio.Event | None,
        ended: anyio.Event,
    ) -> None:
        """Run one actor (once the earlier actor of its execution, ``after``, has ended);
        set ``ended`` when done."""
        stream = lease.stream_id
        finished = False
        try:
            with scope:
                if after is not None:
                    await after.wait()
                await run_leased(self.runtime, lease, started)
                finished = True
        finally:
            was_full = len(self.active) + self.reserved >= self.slots
            # a later actor of the same execution (see _launch) keeps its entries and lease
            current = self.active.get(stream) is scope
            if current:
                del self.active[stream]
                self.runtime.lease_deadlines.pop(stream, None)
                self.runtime.giving_up.discard(stream)
            if self.ended.get(stream) is ended:
                del self.ended[stream]
            ended.set()
            self.ended_since_trim += 1
            self.last_ended = time.monotonic()
            if not finished and current and not scope.cancel_called:
                # the worker stops (its task group is cancelled, not this actor's scope): the
                # attempt is handed over, recorded as suspended, so the next worker's lease
                # is not counted as a lost worker (engine/handover.py); shielded
                await hand_over(self.runtime, lease.stream_id)
            elif not finished and current:
                # its lease was lost, or it was superseded: shielded, a cancelled actor still
                # gives the lease back; if the backend is down, the lease simply expires
                with anyio.CancelScope(shield=True), suppress(BackendUnavailableError):
                    await self.runtime.store.backend.release(
                        self.runtime.worker_id, lease.stream_id
                    )
            # lease again at once if work may wait for this slot (the pool was full and was
            # woken meanwhile, or its last lease filled it), the execution went back to the
            # queue, or the test clock may skip to the next due time; otherwise the next poll
            # or notification finds new work
            if (was_full and self.backlog) or not finished or self.runtime.clock.skips_idle_time:
                self.wake.notify()

    def _answered(self, began: float) -> None:
        """Note how long a lease or renewal call took (:mod:`.outages`)."""
        interval = self.runtime.lease_ms / 3000
        self.runtime.contact.answered(
            began, time.monotonic(), interval, self.runtime.clock.now_ms()
        )

    async def _renew_loop(self) -> None:
        backend = self.runtime.store.backend
        interval = self.runtime.lease_ms / 3000
        while True:
            await anyio.sleep(interval)
            # an actor giving its lease up itself is not losing it
            held = [s for s in self.active if s not in self.runtime.giving_up]
            if not held:
                continue
            now_ms = self.runtime.clock.now_ms()
            began = time.monotonic()
            try:
                kept = set(
                    await backend.renew(self.runtime.worker_id, held, now_ms, self.runtime.lease_ms)
                )
                self._answered(began)
            except BackendUnavailableError as error:
                self.runtime.contact.failed(self.runtime.clock.now_ms())
                _logger.warning("could not renew leases (%s); retrying", error)
                continue
            if self.runtime.held_slots:
                with suppress(BackendUnavailableError):
                    await renew_slots(self.runtime, [s for s in held if s in kept])
            deadline = now_ms + self.runtime.lease_ms
            for stream_id in held:
                if stream_id in kept and stream_id in self.runtime.lease_deadlines:
                    self.runtime.lease_deadlines[stream_id] = deadline
                scope = self.active.get(stream_id)
                # re-checked: an actor may have begun giving its lease up during the renewal
                giving_up = stream_id in self.runtime.giving_up
                if stream_id not in kept and scope is not None and not giving_up:
                    _logger.warning("lost the lease of execution %s; stopping its actor", stream_id)
                    scope.cancel()
