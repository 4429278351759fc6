"""The Engine: step registration, starting executions, queries, and the worker lifecycle.

Constructing an Engine does no I/O. ``async with engine:`` opens the backend and runs
``workers`` executions at once in this process until the block ends; without it the engine
is a client for one-shot calls (``await engine.state_of(...)``), and after ``aclose()`` or
the end of the block it stays usable: the next call reopens the backend.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio

from stepsource.adapters.ports import Backend
from stepsource.adapters.urls import open_backend
from stepsource.aggregates.events import ExecutionEvent
from stepsource.aggregates.values import JSONObject, Limits
from stepsource.engine.attempt import Runtime
from stepsource.engine.clock import Clock, SystemClock
from stepsource.engine.codec import EventCodec, make_cipher
from stepsource.engine.context import StepContext
from stepsource.engine.dag import Node, run_dag, validate_dag
from stepsource.engine.definitions import Handler, RetryPolicy, StepDefinition, build_definition
from stepsource.engine.entropy import Entropy
from stepsource.engine.flow_queries import FlowQueries
from stepsource.engine.handle import ExecutionHandle
from stepsource.engine.notify import Notifier
from stepsource.engine.published import publish
from stepsource.engine.queries import Queries
from stepsource.engine.readmodels import ReadModels
from stepsource.engine.services import _UNSET, ServiceRegistry
from stepsource.engine.starting import Lineage, schedule
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.engine.wakeups import follow_wakeups
from stepsource.engine.worker import WorkerPool
from stepsource.errors import UnknownStepError, UsageError

__all__ = ["Engine"]

H = TypeVar("H", bound=Handler)


class Engine(Queries, FlowQueries):
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
    ) -> None:
        if not isinstance(workers, int) or workers < 0:
            raise UsageError(f"workers must be an int >= 0, not {workers!r}")
        if not lease_seconds > 0 or not poll_interval > 0:
            raise UsageError("lease_seconds and poll_interval must be > 0")
        self.url = url
        self.workers = workers
        self.lease_seconds = float(lease_seconds)
        self.snapshot_every = snapshot_every
        self.poll_interval = poll_interval
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock or SystemClock()
        self.limits = Limits(max_payload_bytes=max_payload_bytes)
        key = cipher_key or os.environ.get("STEPSOURCE_CIPHER_KEY") or None
        self._cipher_key = key
        # an explicit backend object (a custom adapter, or a shared test log) wins over the URL
        self._backend: Backend = backend if backend is not None else open_backend(url)
        self._seed = seed
        self._entropy = Entropy(seed)
        self._on_substep_body: Callable[[str, str], None] | None = None
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
        self._readmodels = ReadModels(self._store, self._backend.readmodel_path())
        self._definitions: dict[str, StepDefinition] = {}
        self._services = ServiceRegistry()
        self._work = Notifier()
        self._changes = Notifier()
        self._running: anyio.CancelScope | None = None
        self._pool: WorkerPool | None = None
        #: handles returned by start(): told of their end in memory when it happens here
        self._started: weakref.WeakValueDictionary[str, ExecutionHandle]
        self._started = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        return f"Engine({self.url!r}, workers={self.workers})"

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
    ) -> Callable[[H], H]:
        """Register an ``async def handler(ctx, ...)`` as the step ``step_id``."""

        def register(handler: H) -> H:
            # Annotations naming classes local to the caller (under postponed evaluation)
            # resolve against the namespace the decorator is applied in.
            localns = sys._getframe(1).f_locals
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
                config=dict(config or {}),
                compatible_with=tuple(compatible_with),
            )
            return handler

        return register

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
        )
        other._definitions = dict(self._definitions)
        other._services = self._services
        return other

    def definition(self, step_id: str) -> StepDefinition:
        try:
            return self._definitions[step_id]
        except KeyError:
            known = ", ".join(sorted(self._definitions)) or "none"
            raise UnknownStepError(
                f"no step {step_id!r} is registered on this engine (registered: {known})",
                step_id=step_id,
                hint="Import the module that defines the step before starting it",
            ) from None

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
        order = validate_dag(flow_id, nodes)
        graph = dict(nodes)

        async def run_flow(ctx: StepContext) -> JSONObject:
            return await run_dag(ctx, graph, order)

        if flow_id in self._definitions:
            raise UsageError("a step or flow with this id is already registered", step_id=flow_id)
        definition = build_definition(
            run_flow, flow_id, version, description=description, flow=True
        )
        self._definitions[flow_id] = definition

    def register_service(
        self, name: str, obj: Any = _UNSET, *, factory: Callable[[], Any] | None = None
    ) -> None:
        """Make ``obj`` (or ``factory()``, called once, lazily) available to ctx.get_service."""
        self._services.register(name, obj, factory=factory)

    # -- starting and attaching ----------------------------------------------------------------
    async def start(
        self,
        step_id: str,
        input: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
    ) -> ExecutionHandle:
        """Validate the input and schedule a new execution; nothing is stored if it is bad.

        A step registered on this engine is validated against its handler's signature; one
        registered only by workers elsewhere, against the input schema they published.
        """
        eid = uuid.UUID(parse_execution_id(execution_id)) if execution_id else uuid.uuid4()
        await schedule(self, step_id, input, eid, correlation_id=correlation_id, priority=priority)
        handle = ExecutionHandle(self, str(eid), step_id=step_id)
        self._started[handle.execution_id] = handle
        return handle

    def get_handle(self, execution_id: str) -> ExecutionHandle:
        """Reattach to an execution by id (no I/O; the first call on it checks it exists)."""
        return ExecutionHandle(self, parse_execution_id(execution_id))

    # -- lifecycle ------------------------------------------------------------------------------
    def _runtime(self) -> Runtime:
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
            on_substep_body=self._on_substep_body,
            start_child=self._start_child,
        )

    def _on_end(self, execution_id: str, terminal: ExecutionEvent) -> None:
        handle = self._started.get(execution_id)
        if handle is not None:
            handle._ended_here(terminal)

    def _on_change(self, execution_id: str) -> None:
        self._changes.notify()
        handle = self._started.get(execution_id)
        if handle is not None:
            handle._wake()

    def _runs_here(self, execution_id: str) -> bool:
        """Whether this engine's pool is running the execution now (its actor reports every
        change in memory, so a handle need not read the log meanwhile)."""
        return self._pool is not None and execution_id in self._pool.active

    async def _start_child(self, lineage: Lineage, **options: Any) -> bool:
        """Schedule a child execution (idempotent on its derived id); whether it is optional."""
        return await schedule(self, lineage=lineage, **options)

    async def __aenter__(self) -> Engine:
        if self._running is not None:
            raise UsageError("this engine is already running (nested `async with engine`)")
        self._work.reset()
        self._changes.reset()
        await self._backend.open()
        if self.workers > 0:
            for definition in self._definitions.values():
                await publish(self._backend, definition)
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._running = self._group.cancel_scope
        await self._group.start(self._readmodels.run, self._changes, self.poll_interval)
        self._group.start_soon(follow_wakeups, self._backend, (self._work, self._changes))
        if self.workers > 0:
            self._pool = WorkerPool(
                self._runtime(),
                slots=self.workers,
                poll_interval=self.poll_interval,
                wake=self._work,
            )
            await self._group.start(self._pool.run)
        return self

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
