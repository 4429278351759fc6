"""The Engine: step registration, starting executions, queries, and the worker lifecycle.

Constructing an Engine does no I/O. ``async with engine:`` opens the backend and runs
``workers`` executions at once in this process until the block ends; without it the engine
is a client for one-shot calls (``await engine.state_of(...)``), and after ``aclose()`` or
the end of the block it stays usable: the next call reopens the backend.
"""

from __future__ import annotations

import inspect
import os
import socket
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import anyio

from stepsource.adapters.ports import Backend
from stepsource.adapters.urls import open_backend
from stepsource.aggregates.events import ExecutionEvent
from stepsource.aggregates.values import JSON, JSONObject, Limits
from stepsource.engine.arguments import check_payload_fits
from stepsource.engine.clock import Clock, SystemClock
from stepsource.engine.codec import EventCodec, make_cipher
from stepsource.engine.collector import WORKER_THRESHOLD
from stepsource.engine.context import StepContext
from stepsource.engine.cron import ScheduleSpec
from stepsource.engine.dag import Node, declared, run_dag, validate_dag
from stepsource.engine.definitions import (
    Durability,
    Handler,
    RetryPolicy,
    StepDefinition,
    build_definition,
    check_durability,
    lookup,
)
from stepsource.engine.encrypted_log import require_key
from stepsource.engine.entropy import Entropy
from stepsource.engine.flowcontrol import FlowLimits, build_limits
from stepsource.engine.forking import fork_execution
from stepsource.engine.handle import ClientServices, ExecutionHandle, message_body
from stepsource.engine.interceptors import Interceptor, check_interceptors
from stepsource.engine.notify import Notifier
from stepsource.engine.parking import release as release_parked
from stepsource.engine.parking import release_for_other_handlers
from stepsource.engine.published import publish
from stepsource.engine.queries import Queries
from stepsource.engine.readmodels import ReadModels
from stepsource.engine.rebuild_helpers import helper_spec
from stepsource.engine.results import resolve_step
from stepsource.engine.runtime import Lineage, Runtime
from stepsource.engine.schedule_step import SCHEDULE_STEP
from stepsource.engine.schedules import (
    ScheduleHandle,
    ScheduleInfo,
    create_schedule,
    list_schedules,
    register_schedule_step,
)
from stepsource.engine.services import UNSET, ServiceRegistry
from stepsource.engine.starting import (
    Starter,
    chosen_execution_id,
    due_time_ms,
    keyed_execution_id,
)
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.engine.unattended import warn_if_unattended
from stepsource.engine.worker import WorkerPool
from stepsource.errors import UsageError, VersionConflictError, mask_credentials
from stepsource.projections.summaries import ExecutionSummary

__all__ = ["Engine"]

H = TypeVar("H", bound=Handler)
R = TypeVar("R")


#: the smallest ``max_payload_bytes`` an engine accepts
MIN_PAYLOAD_BYTES = 1024


class Engine(Queries):
    """One process's entry point to a stepsource backend (see the module docstring)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        workers: int = 8,
        lease_seconds: float = 30.0,
        snapshot_every: int | None = None,
        cipher_key: str | None = None,
        max_payload_bytes: int = 256 * 1024,
        poll_interval: float = 0.25,
        worker_id: str | None = None,
        clock: Clock | None = None,
        seed: bytes | None = None,
        backend: Backend | None = None,
        durability: Durability = "boundary",
        interceptors: Sequence[Interceptor] = (),
        gc_threshold: int | None = WORKER_THRESHOLD,
        rebuild_processes: int | None = None,
    ) -> None:
        if not isinstance(workers, int) or workers < 0:
            raise UsageError(f"workers must be an int >= 0, not {workers!r}")
        if gc_threshold is not None and (type(gc_threshold) is not int or gc_threshold < 1):
            raise UsageError(
                f"gc_threshold must be an int >= 1 or None, not {gc_threshold!r}",
                hint="None leaves Python's garbage collector as it is",
            )
        if rebuild_processes is not None and (
            type(rebuild_processes) is not int or rebuild_processes < 0
        ):
            raise UsageError(
                f"rebuild_processes must be an int >= 0 or None, not {rebuild_processes!r}",
                hint="None starts one helper per core for a large catch-up; 0 starts none",
            )
        #: helper processes a large catch-up or rebuild starts (None: one per core; see
        #: .rebuild_helpers)
        self.rebuild_processes = rebuild_processes
        #: the garbage collector's youngest threshold while this engine's workers run
        #: (engine/collector.py); None leaves the collector alone
        self.gc_threshold = gc_threshold
        if not lease_seconds > 0 or not poll_interval > 0:
            raise UsageError("lease_seconds and poll_interval must be > 0")
        if (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or max_payload_bytes < MIN_PAYLOAD_BYTES
        ):
            raise UsageError(
                f"max_payload_bytes must be an int >= {MIN_PAYLOAD_BYTES}, not "
                f"{max_payload_bytes!r}",
                hint="An execution's first event (its step's definition and its input) takes "
                "about 700 bytes: a smaller limit would refuse every execution",
            )
        # the argument, else $STEPSOURCE_URL, else ./stepsource.db: as the command line does
        url = url if url is not None else os.environ.get("STEPSOURCE_URL") or None
        self.url = url
        self.durability: Durability = check_durability(durability)
        #: wrap starts, attempts, ctx.do bodies, waits and messages (the first is outermost)
        self.interceptors: tuple[Interceptor, ...] = check_interceptors(interceptors)
        self.workers = workers
        self.lease_seconds = float(lease_seconds)
        self.snapshot_every = snapshot_every
        self.poll_interval = poll_interval
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if clock is not None and not isinstance(clock, Clock):
            raise UsageError(
                f"clock must be a stepsource Clock, not {type(clock).__name__}",
                hint="Pass stepsource.testing.SkippingClock() in tests, or leave it out",
            )
        if seed is not None and not isinstance(seed, bytes):
            raise UsageError(
                f"seed must be bytes or None, not {type(seed).__name__}",
                hint="For example seed=b'tests'; the same seed draws the same values",
            )
        self.clock = clock or SystemClock()
        self.limits = Limits(max_payload_bytes=max_payload_bytes)
        key = cipher_key or os.environ.get("STEPSOURCE_CIPHER_KEY") or None
        self._cipher_key = key
        # an explicit backend object (a custom adapter, or a shared test log) wins over the URL
        self._backend: Backend = backend if backend is not None else open_backend(url)
        self._seed = seed
        self._entropy = Entropy(seed)
        #: called with (execution id, ctx.do name) each time a sub-step body starts here: a
        #: hook for testing tools (``crash_everywhere`` counts bodies run again with it)
        self.on_substep_body: Callable[[str, str], None] | None = None
        #: called with (execution id, operation name) as each recording operation of an
        #: execution running here begins: a hook for testing tools (``crash_everywhere``)
        self.on_operation: Callable[[str, str], None] | None = None
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 1
        ):
            raise UsageError(f"snapshot_every must be an int >= 1 or None, not {snapshot_every!r}")
        self._store = ExecutionStore(
            self._backend,
            EventCodec(make_cipher(key) if key else None),
            self.limits,
            snapshot_every=snapshot_every,
        )
        super().__init__(
            self._store,
            ReadModels(
                self._store,
                self._backend.readmodel_path(),
                gc_threshold=self.gc_threshold,
                helpers=helper_spec(url, key, backend, rebuild_processes),
            ),
            self.runtime,
        )
        self._definitions: dict[str, StepDefinition] = {}
        self._flow_limits: dict[str, FlowLimits] = {}
        self._services = ServiceRegistry()
        self._work = Notifier()
        self._changes = Notifier()
        self._running: anyio.CancelScope | None = None
        self._pool: WorkerPool | None = None
        self._starter = Starter(
            self._store,
            self._definitions,
            self.clock,
            self._work,
            lambda: self._pool,
            self.interceptors,
            self._flow_limits,
        )
        self._client = ClientServices(
            store=self._store,
            clock=self.clock,
            work=self._work,
            changes=self._changes,
            runs_here=self._runs_here,
            runtime=self.runtime,
            interceptors=self.interceptors,
        )
        #: handles returned by start(): told of their end in memory when it happens here
        self._started: weakref.WeakValueDictionary[str, ExecutionHandle[Any]]
        self._started = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        shown = None if self.url is None else mask_credentials(self.url)
        return f"Engine({shown!r}, workers={self.workers})"

    @property
    def store(self) -> ExecutionStore:
        """The execution store below this engine: loads and commits executions and reads
        their events (for tools such as export and the testing toolkit)."""
        return self._store

    # -- registration ------------------------------------------------------------------------
    def step(
        self,
        step_id: str,
        *,
        version: str = "1",
        display_name: str | None = None,
        description: str | None = None,
        max_retries: int = 0,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        priority: int = 0,
        optional: bool = False,
        config: Mapping[str, Any] | None = None,
        compatible_with: tuple[str, ...] = (),
        migrate_input: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
        durability: Durability | None = None,
        concurrency: int | None = None,
        concurrency_key: str | Callable[[Mapping[str, Any]], object] | None = None,
        rate_limit: str | None = None,
    ) -> Callable[[H], H]:
        """Register an ``async def handler(ctx, ...)`` as the step ``step_id``.

        ``durability`` overrides the engine's for this step: ``"boundary"`` commits what the
        handler records at its next side effect, ``"each"`` commits every operation.
        ``concurrency``, ``concurrency_key`` and ``rate_limit`` limit how many executions run
        at once and how many attempts begin per window, across every worker of the backend
        (:mod:`stepsource.engine.flowcontrol`).
        ``migrate_input`` brings an input recorded for an older signature (an execution
        started before a required field was added) to the current one before it is validated.
        """
        limits = build_limits(step_id, concurrency, concurrency_key, rate_limit)

        def register(handler: H) -> H:
            # Annotations naming classes local to the caller (under postponed evaluation)
            # resolve against the namespace the decorator is applied in.
            frame = inspect.currentframe()
            caller = frame.f_back if frame is not None else None
            localns = dict(caller.f_locals) if caller is not None else {}
            del frame, caller
            self._refuse_while_serving(step_id, "a step")
            if step_id in self._definitions:
                raise UsageError(
                    "a step with this id is already registered on this engine",
                    step_id=step_id,
                    hint="Give each step a unique id; bump version= for a new implementation",
                )
            self._definitions[step_id] = build_definition(
                handler,
                step_id,
                version,
                localns=localns,
                display_name=display_name,
                description=description,
                max_retries=max_retries,
                retry=retry or RetryPolicy(),
                timeout=timeout,
                priority=priority,
                optional=optional,
                config=config,
                compatible_with=compatible_with,
                migrate_input=migrate_input,
                durability=durability,
            )
            if limits is not None:
                self._flow_limits[step_id] = limits
            return handler

        return register

    def _refuse_while_serving(self, step_id: str, what: str) -> None:
        """Registering on a running engine with workers: refused, as they lease only the
        steps registered when they started (a client engine may still learn a step)."""
        if self._running is not None and self.workers > 0:
            raise UsageError(
                f"{what} registered while the engine runs would not be served: its workers "
                "lease the steps registered when `async with engine` began",
                step_id=step_id,
                hint="Register every step before the engine starts (at import, beside the "
                "Engine), or in another engine started after it",
            )

    def live_executions(self) -> list[str]:
        """Executions this process runs right now (a suspended one is never among them)."""
        return sorted(self._pool.active) if self._pool is not None and self._running else []

    def step_ids(self) -> list[str]:
        return sorted(self._definitions)

    def derive(
        self,
        *,
        url: str | None = None,
        workers: int | None = None,
        lease_seconds: float | None = None,
        backend: Backend | None = None,
        clock: Clock | None = None,
        seed: bytes | None = None,
        poll_interval: float | None = None,
        durability: Durability | None = None,
        interceptors: Sequence[Interceptor] | None = None,
    ) -> Engine:
        """A new Engine with the same steps and services, some options overridden."""
        other = Engine(
            url if url is not None else self.url,
            workers=self.workers if workers is None else workers,
            lease_seconds=self.lease_seconds if lease_seconds is None else lease_seconds,
            snapshot_every=self.snapshot_every,
            cipher_key=self._cipher_key,
            max_payload_bytes=self.limits.max_payload_bytes,
            poll_interval=self.poll_interval if poll_interval is None else poll_interval,
            clock=self.clock if clock is None else clock,
            seed=self._seed if seed is None else seed,
            backend=backend,
            durability=self.durability if durability is None else durability,
            interceptors=self.interceptors if interceptors is None else interceptors,
            rebuild_processes=self.rebuild_processes,
        )
        other._definitions.update(self._definitions)
        other._flow_limits.update(self._flow_limits)
        other._services = self._services
        return other

    def definition(self, step_id: str) -> StepDefinition:
        return lookup(self._definitions, step_id)

    def dag(
        self,
        flow_id: str,
        nodes: Mapping[str, Node],
        *,
        version: str = "1",
        description: str | None = None,
    ) -> None:
        """Define a DAG flow started like a step (``engine.start(flow_id, input)``); see
        :mod:`stepsource.engine.dag`. A cycle or an unknown dependency is refused here."""
        self._refuse_while_serving(flow_id, "a DAG")
        order = validate_dag(flow_id, nodes)
        graph = dict(nodes)

        async def run_flow(ctx: StepContext) -> JSONObject:
            return await run_dag(ctx.recorder, graph, order)

        if flow_id in self._definitions:
            raise UsageError("a step or flow with this id is already registered", step_id=flow_id)
        definition = build_definition(
            run_flow, flow_id, version, description=description, flow=True, nodes=declared(graph)
        )
        self._definitions[flow_id] = definition

    def register_service(
        self, name: str, obj: Any = UNSET, *, factory: Callable[[], Any] | None = None
    ) -> None:
        """Make ``obj`` (or ``factory()``, called once, lazily) available to ctx.get_service."""
        self._services.register(name, obj, factory=factory)

    # -- starting and attaching ----------------------------------------------------------------
    @overload
    async def start(
        self,
        step_id: Callable[..., Awaitable[R]],
        input: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        start_at: datetime | None = None,
        delay: float | None = None,
        key: str | None = None,
        if_exists: Literal["attach", "error"] = "attach",
    ) -> ExecutionHandle[R]: ...
    @overload
    async def start(
        self,
        step_id: str,
        input: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        start_at: datetime | None = None,
        delay: float | None = None,
        key: str | None = None,
        if_exists: Literal["attach", "error"] = "attach",
    ) -> ExecutionHandle[JSON]: ...
    async def start(
        self,
        step_id: str | Callable[..., Awaitable[Any]],
        input: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        start_at: datetime | None = None,
        delay: float | None = None,
        key: str | None = None,
        if_exists: Literal["attach", "error"] = "attach",
    ) -> ExecutionHandle[Any]:
        """Validate the input and schedule a new execution; nothing is stored if it is bad.

        ``key`` (a business key, such as an order number) starts at most one execution per
        key and step, ever, across processes: starting again returns the existing
        execution's handle whatever its input, or raises VersionConflictError with
        ``if_exists="error"``. The execution id is derived from the step and the key.

        ``start_at`` (a timezone-aware datetime) or ``delay`` (seconds) schedules it for
        later: it waits in the queue, holding no worker, until then.

        ``step_id`` is the step's id, or its handler function registered here (then the
        handle's ``result()`` is validated into the handler's return annotation). A step
        registered on this engine is validated against its handler's signature; one
        registered only by workers elsewhere, against the input schema they published. A
        step no worker has published is logged as a warning (nothing would run it yet).
        """
        step, output = resolve_step(self._definitions, step_id)
        due_ms = due_time_ms(self.clock, start_at, delay, step_id=step)
        if key is not None:
            eid = uuid.UUID(keyed_execution_id(step, key, execution_id, if_exists))
        else:
            eid = uuid.uuid4() if execution_id is None else chosen_execution_id(execution_id, step)
        try:
            await self._starter.schedule(
                step,
                input,
                eid,
                correlation_id=correlation_id,
                priority=priority,
                due_ms=due_ms,
                key=key,
            )
        except VersionConflictError:
            if key is None or if_exists == "error":
                raise
            return ExecutionHandle(self._client, str(eid), step_id=step, output=output)
        handle: ExecutionHandle[Any] = ExecutionHandle(
            self._client, str(eid), step_id=step, output=output
        )
        self._started[handle.execution_id] = handle
        await warn_if_unattended(self._backend, step, handle.execution_id)
        return handle

    async def fork(self, execution_id: str, at_version: int) -> ExecutionHandle[JSON]:
        """A new execution whose log starts as ``execution_id``'s first ``at_version``
        events, then runs the current handler code on from there (see
        :mod:`stepsource.engine.forking`); its handle."""
        fork_id = await fork_execution(
            self._store, self.clock, execution_id, at_version, notify=self._work.notify
        )
        return ExecutionHandle(self._client, fork_id)

    async def signal_with_start(
        self,
        step_id: str,
        input: Mapping[str, Any] | None,
        *,
        key: str,
        signal: str,
        payload: Any = None,
    ) -> ExecutionHandle[JSON]:
        """Start the execution of ``step_id`` with the business key ``key`` unless it exists,
        then send it ``signal``: the signal reaches the one execution of that key either way.
        A signal that could not be sent is refused before anything is started."""
        message_body("signal", signal, {"payload": payload}, self.limits, {"step_id": step_id})
        handle = await self.start(step_id, input, key=key)
        await handle.signal(signal, payload)
        return handle

    def handle_for_key(self, step_id: str, key: str) -> ExecutionHandle[JSON]:
        """Reattach to the execution of ``step_id`` started with the business key ``key``
        (no I/O; the first call on it checks it exists)."""
        return ExecutionHandle(self._client, keyed_execution_id(step_id, key, None, "attach"))

    def get_handle(self, execution_id: str) -> ExecutionHandle[JSON]:
        """Reattach to an execution by id (no I/O; the first call on it checks it exists)."""
        return ExecutionHandle(self._client, parse_execution_id(execution_id))

    # -- schedules ------------------------------------------------------------------------------
    def enable_schedules(self) -> None:
        """Let this engine's workers run schedules: registers the built-in step
        ``stepsource.schedule`` (``schedule()`` calls it). Call it where a worker process
        builds its engine (:mod:`stepsource.engine.schedules`)."""
        if SCHEDULE_STEP not in self._definitions:
            register_schedule_step(self.step)

    async def schedule(
        self,
        name: str,
        step: str | Callable[..., Awaitable[Any]],
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        input: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        overlap: Literal["skip", "buffer_one", "allow"] = "skip",
        catch_up: float | timedelta = 60.0,
    ) -> ScheduleHandle:
        """Run ``step`` with ``input`` at every slot of ``cron`` (in ``timezone``) or
        ``every`` seconds, exactly once per slot across every worker (see
        :mod:`stepsource.engine.schedule_step`). ``overlap``: what a slot does while the last
        one's execution still runs; ``catch_up``: how late (seconds) a missed slot still
        fires. Declaring it again with the same definition attaches to it."""
        step_id, _ = resolve_step(self._definitions, step)
        spec = ScheduleSpec.build(
            name, cron=cron, every=every, timezone=timezone, overlap=overlap, catch_up=catch_up
        )
        if self._pool is not None and SCHEDULE_STEP not in self._pool.runtime.definitions:
            raise UsageError(
                "this engine's workers started without schedules, so they would not run it",
                hint="Call engine.enable_schedules() before `async with engine` (or where the "
                "worker process builds its engine)",
            )
        self.enable_schedules()
        definition = self._definitions.get(step_id)
        return await create_schedule(self, self.start, name, step_id, spec, input, definition)

    def get_schedule(self, name: str) -> ScheduleHandle:
        """The schedule ``name`` (no I/O; the first call on it checks it exists)."""
        return ScheduleHandle(self, name)

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule not deleted, by name."""
        return await list_schedules(self)

    def ui_app(
        self,
        *,
        read_only: bool = True,
        token: str | None = None,
        allowed_hosts: Sequence[str] | None = None,
    ) -> Any:
        """The web UI over this engine as an ASGI app to mount in a service (the ``ui``
        extra): read-only unless ``read_only=False``; with ``token``, every request needs it;
        with ``allowed_hosts``, a request whose Host header names another is a 400."""
        from stepsource.engine.ui import create_app

        return create_app(self, read_only=read_only, token=token, allowed_hosts=allowed_hosts)

    async def release(self, execution_id: str) -> None:
        """Put a parked execution (its history ends in ``parked``) back in the queue, once a
        handler that can resume it is deployed; UsageError if it is not parked."""
        await release_parked(self._store, self.clock, parse_execution_id(execution_id))
        self._work.notify()

    # -- lifecycle ------------------------------------------------------------------------------
    def runtime(self) -> Runtime:
        """The services this engine's executions run with (its actors, replays and queries
        each take a fresh one: a snapshot of the registered steps)."""
        return Runtime(
            store=self._store,
            definitions=dict(self._definitions),
            services=self._services,
            clock=self.clock,
            worker_id=self.worker_id,
            lease_ms=int(self.lease_seconds * 1000),
            on_change=self._on_change,
            on_end=self._on_end,
            entropy=self._entropy,
            on_substep_body=self.on_substep_body,
            start_child=self._start_child,
            durability=self.durability,
            on_operation=self.on_operation,
            interceptors=self.interceptors,
            flow_limits=dict(self._flow_limits),
        )

    def _on_end(self, execution_id: str, terminal: ExecutionEvent) -> None:
        handle = self._started.get(execution_id)
        if handle is not None:
            handle.ended_here(terminal)

    def _on_change(self, execution_id: str) -> None:
        self._changes.notify()
        handle = self._started.get(execution_id)
        if handle is not None:
            handle.wake()

    def _runs_here(self, execution_id: str) -> bool:
        """Whether this engine's pool is running the execution now (its actor reports every
        change in memory, so a handle need not read the log meanwhile)."""
        return self._pool is not None and execution_id in self._pool.active

    async def _start_child(self, lineage: Lineage | None, **options: Any) -> bool:
        """Schedule a child execution, or a run's successor (``lineage`` None), idempotent on
        its derived id; whether it is optional."""
        return await self._starter.schedule(lineage=lineage, **options)

    async def __aenter__(self) -> Engine:
        if self._running is not None:
            raise UsageError("this engine is already running (nested `async with engine`)")
        self._work.reset()
        self._changes.reset()
        await self._backend.open()
        check_payload_fits(self.limits, self._backend.max_commit_bytes)
        await require_key(
            self._store, "this engine would write in clear and take its executions for damage"
        )
        if self.workers > 0:
            for definition in self._definitions.values():
                await publish(self._backend, definition)
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._running = self._group.cancel_scope
        await self._group.start(self._readmodels.run, self._changes, self.poll_interval)
        # changes made by other processes, where the backend tells of them (Backend.watch)
        await self._group.start(self._backend.watch, self._work.notify, self._on_change)
        if self.workers > 0:
            self._pool = WorkerPool(
                self.runtime(),
                slots=self.workers,
                poll_interval=self.poll_interval,
                wake=self._work,
                gc_threshold=self.gc_threshold,
            )
            await self._group.start(self._pool.run)
            self._group.start_soon(self._release_parked_for_this_code)
        return self

    async def _release_parked_for_this_code(self) -> None:
        """A worker whose handlers differ from those that parked executions may resume them:
        put those back in the queue once, as this worker starts (engine/parking.py)."""

        async def parked(step_id: str, cursor: str | None, limit: int) -> list[ExecutionSummary]:
            return await self.executions(
                status="parked", step_id=step_id, limit=limit, cursor=cursor
            )

        definitions = list(self._definitions.values())
        if await release_for_other_handlers(self._store, self.clock, definitions, parked):
            self._work.notify()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._running is not None
        self._running.cancel()
        try:
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                # the block's own exception reaches the caller as it is, not in a group
                await self._group.__aexit__(None, None, None)
                return False
            return await self._group.__aexit__(exc_type, exc, tb)
        finally:
            self._running = None
            await self.aclose()

    async def aclose(self) -> None:
        """Close the backend's connections; the engine stays usable (calls reopen it)."""
        await self._readmodels.aclose()
        await self._backend.aclose()
