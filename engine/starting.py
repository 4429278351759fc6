"""Scheduling a new execution: validate, then append StepScheduled with the queue entry.

Shared by ``engine.start`` and by a parent starting a child (``ctx.start_step``, DAG
nodes). Nothing is appended unless the input is valid.

**Local start.** When this engine's own worker pool runs the step and has a free slot (and
the backend can lease in a commit), the execution does not wait in the queue: one commit
holds StepScheduled, StepLeased and StepStarted with the queue row leased to this worker,
and the pool runs the handler at once. The log is the same as through the queue (the three
events share one commit instead of two); if this process dies, the lease expires and any
worker resumes the execution by replay, as after any crash.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import anyio

from stepsource.adapters.ports import Commit, Lease, QueueUpdate
from stepsource.aggregates.events import ExecutionEvent
from stepsource.aggregates.execution import StepExecution
from stepsource.aggregates.values import JSONObject, to_json_object
from stepsource.engine.arguments import (
    check_name,
    check_optional_id,
    check_priority,
    check_size,
    json_size,
)
from stepsource.engine.clock import MAX_WAIT_SECONDS, Clock, to_ms
from stepsource.engine.definitions import StepDefinition
from stepsource.engine.encrypted_log import require_key
from stepsource.engine.flowcontrol import FlowLimits
from stepsource.engine.ids import execution_id_for_key
from stepsource.engine.interceptors import Interceptor, StartInfo, hooked, intercept
from stepsource.engine.leasing import lease_and_start
from stepsource.engine.notify import Notifier
from stepsource.engine.published import fetch_published
from stepsource.engine.runtime import Lineage, Runtime
from stepsource.engine.scope import SCOPE
from stepsource.engine.store import ExecutionStore
from stepsource.errors import UsageError, VersionConflictError

__all__ = ["LocalSlots", "Starter", "chosen_execution_id", "due_time_ms", "keyed_execution_id"]

#: the longest business key (characters)
MAX_KEY_LENGTH = 1024


def chosen_execution_id(execution_id: object, step_id: str) -> uuid.UUID:
    """The id a caller gave ``engine.start``: a UUID (an id that is not one is refused with a
    pointer to business keys, what callers with their own ids usually want)."""
    if isinstance(execution_id, str):
        with contextlib.suppress(ValueError):
            return uuid.UUID(execution_id)
    raise UsageError(
        f"execution_id must be a UUID in a str, not {execution_id!r}",
        step_id=step_id,
        hint="Leave it out for a new one; to start at most one execution per id of "
        "yours, give it as the key instead (key= in engine.start, --key in `stepsource start`)",
    )


def keyed_execution_id(
    step_id: str, key: object, execution_id: str | None, if_exists: object
) -> str:
    """The execution id a business key stands for, or UsageError for bad arguments."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise UsageError(
            f"a business key is a non-empty str of at most {MAX_KEY_LENGTH} characters",
            step_id=step_id,
        )
    if not key.isprintable() or any(0xD800 <= ord(ch) <= 0xDFFF for ch in key):
        raise UsageError("a business key is printable text", step_id=step_id)
    if execution_id is not None:
        raise UsageError(
            "give an execution_id or a key, not both: a key chooses the id", step_id=step_id
        )
    if if_exists not in ("attach", "error"):
        raise UsageError(
            f"if_exists must be 'attach' or 'error', not {if_exists!r}", step_id=step_id
        )
    return execution_id_for_key(step_id, key)


def due_time_ms(
    clock: Clock, start_at: datetime | None, delay: float | None, *, step_id: str | None = None
) -> int | None:
    """When a start with ``start_at`` or ``delay`` is due (epoch ms), None for now."""
    if start_at is not None and delay is not None:
        raise UsageError("give start_at or delay, not both", step_id=step_id)
    if start_at is not None:
        if not isinstance(start_at, datetime) or start_at.tzinfo is None:
            raise UsageError(
                f"start_at must be a timezone-aware datetime, not {start_at!r}",
                step_id=step_id,
                hint="For example datetime(2027, 1, 1, 9, 0, tzinfo=UTC)",
            )
        return to_ms(start_at)
    if delay is not None:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or not 0 <= delay < MAX_WAIT_SECONDS
        ):
            raise UsageError(
                f"delay must be a number of seconds from 0 to 10**9 (about 31 years), not "
                f"{delay!r}",
                step_id=step_id,
            )
        return clock.now_ms() + int(delay * 1000)
    return None


class LocalSlots(Protocol):
    """A worker pool of this process that can run a started execution at once."""

    runtime: Runtime

    def reserve(self, step_id: str) -> bool: ...

    def unreserve(self) -> None: ...

    def adopt(
        self, lease: Lease, aggregate: StepExecution, events: list[ExecutionEvent]
    ) -> bool: ...


class Starter:
    """Schedules executions: ``engine.start`` and a parent's children go through here.

    ``definitions`` are the steps registered in this process (a live mapping: registrations
    made later count), ``work`` wakes this process's workers, and ``local()`` is the pool that
    may run a start at once (None while no pool runs).
    """

    def __init__(
        self,
        store: ExecutionStore,
        definitions: Mapping[str, StepDefinition],
        clock: Clock,
        work: Notifier,
        local: Callable[[], LocalSlots | None],
        interceptors: tuple[Interceptor, ...] = (),
        flow_limits: Mapping[str, FlowLimits] | None = None,
    ) -> None:
        self.interceptors = interceptors
        #: the flow limits of the steps registered here (a live mapping, as ``definitions``)
        self.flow_limits: Mapping[str, FlowLimits] = {} if flow_limits is None else flow_limits
        self.store = store
        self.definitions = definitions
        self.clock = clock
        self.work = work
        self.local = local

    async def schedule(
        self,
        step_id: str,
        input: Mapping[str, Any] | None,
        execution_id: uuid.UUID,
        *,
        correlation_id: str | None = None,
        priority: int | None = None,
        lineage: Lineage | None = None,
        due_ms: int | None = None,
        key: str | None = None,
        continues: tuple[str, str, int] | None = None,
    ) -> bool:
        """Schedule the execution (due at ``due_ms``, default now; ``key``: the business key
        its id was derived from; ``continues``: (the run it continues, the chain's first run,
        its number in the chain)); return whether it
        is optional. A child or successor whose id exists already (a replayed start) is not
        scheduled twice."""
        headers: dict[str, str] = {}

        async def work() -> bool:
            return await _schedule(
                self,
                step_id,
                input,
                execution_id,
                correlation_id=correlation_id,
                priority=priority,
                lineage=lineage,
                headers=headers,
                due_ms=due_ms,
                key=key,
                continues=continues,
            )

        chain = hooked(self.interceptors, "start")
        if not chain:
            return await work()
        info = StartInfo(
            step_id=step_id,
            execution_id=str(execution_id),
            correlation_id=correlation_id,
            parent_execution_id=lineage.parent_execution_id if lineage else None,
            headers=headers,
        )
        return await intercept(chain, "start", info, work)


async def _requeue_if_never_leased(starter: Starter, execution_id: str, queue: QueueUpdate) -> None:
    """An execution scheduled but never leased must be in the queue.

    Where a backend writes the queue entry after the commit (NATS), a crash in between leaves
    a StepScheduled with no entry: nothing would ever run it. Starting it again (a resumed
    parent, a client retrying with the same id) repairs that. Guarded by the version: once a
    worker has leased it, the stream has moved on and this does nothing.
    """
    backend = starter.store.backend
    if await backend.stream_version(execution_id) != 1:
        return
    try:
        await backend.append(Commit(execution_id, 1, (), queue=queue))
    except VersionConflictError:
        return  # a worker took it meanwhile: it is running
    starter.work.notify()


async def _schedule(
    starter: Starter,
    step_id: str,
    input: Mapping[str, Any] | None,
    execution_id: uuid.UUID,
    *,
    correlation_id: str | None = None,
    priority: int | None = None,
    lineage: Lineage | None = None,
    headers: dict[str, str] | None = None,
    due_ms: int | None = None,
    key: str | None = None,
    continues: tuple[str, str, int] | None = None,
) -> bool:
    eid = str(execution_id)
    now_ms = starter.clock.now_ms()
    due = now_ms if due_ms is None else due_ms
    limits = starter.store.limits
    # the same limits on every backend, before anything is stored
    if isinstance(step_id, str) and step_id:  # an empty one is an unknown step
        check_name(step_id, "the step id", limits, execution_id=eid)
    check_priority(priority, execution_id=eid, step_id=step_id)
    check_optional_id(correlation_id, "correlation_id", limits, execution_id=eid, step_id=step_id)
    data = to_json_object(
        {} if input is None else input,
        what="input",
        execution_id=eid,
        step_id=step_id,
        limits=limits,
    )
    check_size(json_size(data), "the input", limits, execution_id=eid, step_id=step_id)
    await require_key(
        starter.store, "the input would be stored in clear, where the workers cannot read it"
    )
    local = starter.definitions.get(step_id)
    if local is not None:
        local.input_kwargs(data, execution_id=eid)
        flow = starter.flow_limits.get(step_id)
        if flow is not None:  # a key function that cannot answer this input: refused now
            flow.key_of(local.input_with_defaults(data, execution_id=eid), eid)
        version, snapshot = local.version, local.recorded_snapshot
    else:
        published = await fetch_published(
            starter.store.backend, step_id, sorted(starter.definitions)
        )
        published.validate_input(data, execution_id=eid)
        version = published.version
        snapshot = to_json_object(published.snapshot, what="definition", step_id=step_id)
    default_priority = snapshot.get("priority", 0)
    max_retries = snapshot.get("max_retries", 0)
    retry_policy = snapshot.get("retry")
    config: Any = snapshot.get("config") or {}
    assert isinstance(default_priority, int)
    assert isinstance(max_retries, int)
    assert retry_policy is None or isinstance(retry_policy, dict)
    optional = bool(snapshot.get("optional", False))
    dependencies: JSONObject = {}
    if lineage is not None:
        if lineage.optional is not None:
            optional = lineage.optional
        if lineage.config is not None:
            config = to_json_object(lineage.config, what="node config", step_id=step_id)
        if lineage.dependencies is not None:
            dependencies = to_json_object(
                lineage.dependencies, what="dependency results", step_id=step_id
            )
    assert isinstance(config, dict)
    effective_priority = default_priority if priority is None else priority
    aggregate = StepExecution.schedule(
        execution_id=execution_id,
        timestamp=starter.clock.now(),
        step_id=step_id,
        step_version=version,
        definition=snapshot,
        input=data,
        config=config,
        dependencies=dependencies,
        flow_id=lineage.flow_id if lineage else (step_id if snapshot.get("flow") else None),
        root_execution_id=lineage.root_execution_id if lineage else None,
        parent_id=lineage.parent_step_id if lineage else None,
        parent_execution_id=lineage.parent_execution_id if lineage else None,
        correlation_id=correlation_id,
        priority=effective_priority,
        optional=optional,
        max_retries=max_retries,
        retry_policy=retry_policy,
        due_ms=due,
        limits=starter.store.limits,
        headers=headers,
        key=key,
        continues=continues,
    )
    queue = QueueUpdate(
        kind="enqueue", step_id=step_id, priority=effective_priority, due_ms=aggregate.due_ms
    )
    # a start due later waits in the queue; one due now may run here at once
    runs_here = starter.store.backend.leases_in_commit and due <= now_ms
    pool = starter.local() if runs_here else None
    try:
        if pool is not None and pool.reserve(step_id):
            await _start_here(starter, pool, aggregate)
            return optional  # running here already: nothing to wake
        await starter.store.commit(aggregate, queue=queue)
    except VersionConflictError:
        await _requeue_if_never_leased(starter, eid, queue)
        if lineage is not None or continues is not None:
            return optional  # started before the parent (predecessor) could record it
        raise VersionConflictError(
            "an execution with this id already exists",
            execution_id=eid,
            step_id=step_id,
            hint="Use engine.get_handle(execution_id) to attach to it, or pick a new id",
        ) from None
    starter.work.notify()
    return optional


async def _start_here(starter: Starter, pool: LocalSlots, aggregate: StepExecution) -> None:
    """Schedule, lease and start in one commit, then run in the slot ``pool`` reserved."""
    runtime = pool.runtime
    definition = runtime.definitions[aggregate.step_id]
    now = starter.clock.now()
    lease_and_start(runtime, aggregate, definition, now)
    expires_ms = to_ms(now) + runtime.lease_ms
    queue = QueueUpdate(
        kind="lease",
        step_id=aggregate.step_id,
        priority=aggregate.priority,
        due_ms=aggregate.due_ms,
        owner=runtime.worker_id,
        lease_expires_ms=expires_ms,
    )
    try:
        events = await starter.store.commit(aggregate, queue=queue)
    except BaseException:
        pool.unreserve()
        raise
    lease = Lease(aggregate.execution_id, aggregate.step_id, aggregate.priority, expires_ms)
    # the task the pool spawns copies this context: the new execution's operations must not
    # be recorded in the scope of the starter's ctx.do (a start from inside a sub-step body)
    token = SCOPE.set("")
    try:
        adopted = pool.adopt(lease, aggregate, events)
    finally:
        SCOPE.reset(token)
    if not adopted:  # the pool stopped meanwhile
        with anyio.CancelScope(shield=True):
            await starter.store.backend.release(runtime.worker_id, lease.stream_id)
