"""What an actor, the handler runner and the context need from their engine: its services.

The :class:`Runtime` is built by the Engine (``Engine.runtime()``) and handed down; nothing
below the Engine sees the Engine itself. :class:`Lineage` is what a parent passes when it
schedules a child through ``Runtime.start_child``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stepsource.aggregates import events as ev
from stepsource.engine.bodies import BodyThreads
from stepsource.engine.clock import Clock
from stepsource.engine.commit_grace import CommitGrace
from stepsource.engine.definitions import Durability, StepDefinition, lookup
from stepsource.engine.entropy import Entropy
from stepsource.engine.flowcontrol import FlowLimits
from stepsource.engine.interceptors import Interceptor
from stepsource.engine.outages import ContactLog
from stepsource.engine.services import ServiceRegistry
from stepsource.engine.store import ExecutionStore

__all__ = ["Lineage", "Runtime"]


@dataclass(frozen=True)
class Lineage:
    """Where a child execution comes from: its parent's ids, and a DAG node's settings."""

    parent_step_id: str
    parent_execution_id: str
    root_execution_id: str
    flow_id: str | None
    node: str | None = None
    optional: bool | None = None
    config: Mapping[str, Any] | None = None
    dependencies: Mapping[str, Any] | None = None


@dataclass
class Runtime:
    """The services of one engine that running executions use."""

    store: ExecutionStore
    definitions: dict[str, StepDefinition]
    services: ServiceRegistry
    clock: Clock
    worker_id: str
    lease_ms: int
    on_change: Callable[[str], None]
    entropy: Entropy = field(default_factory=Entropy)
    #: called with (execution id, ctx.do name) each time a sub-step body starts (testing)
    on_substep_body: Callable[[str, str], None] | None = None
    #: schedules a child execution (idempotent on its derived id); whether it is optional
    start_child: Callable[..., Awaitable[bool]] | None = None
    #: executions whose actor is giving its lease up itself (a suspension, an end, a retry, a
    #: release): the renewal loop must not take that for a lost lease
    giving_up: set[str] = field(default_factory=set)
    #: told (execution id, terminal event) once an actor's terminal commit is durable, so a
    #: handle waiting in this process returns without reading the log
    on_end: Callable[[str, ev.ExecutionEvent], None] | None = None
    #: the engine's durability mode (a step's own ``durability=`` wins)
    durability: Durability = "boundary"
    #: when each lease this worker holds lapses unless renewed (epoch ms, by the runtime's
    #: clock), kept by the pool; an actor checks it before running a side effect
    lease_deadlines: dict[str, int] = field(default_factory=dict)
    #: called with (execution id, operation name) as each recording operation begins: a hook
    #: for testing tools (``crash_everywhere`` crashes a worker between two operations)
    on_operation: Callable[[str, str], None] | None = None
    #: the engine's interceptors, the first one outermost
    interceptors: tuple[Interceptor, ...] = ()
    #: the threads sync ``ctx.do`` bodies run in (each started on demand)
    body_threads: BodyThreads = field(default_factory=BodyThreads)
    #: steps' concurrency and rate limits (:mod:`.flowcontrol`), and the concurrency slot key
    #: each execution this worker runs holds
    flow_limits: dict[str, FlowLimits] = field(default_factory=dict)
    held_slots: dict[str, str] = field(default_factory=dict)
    #: when this worker last failed to reach the backend (:mod:`.outages`)
    contact: ContactLog = field(default_factory=ContactLog)
    #: bounds each commit's wait for the backend (:mod:`.commit_grace`)
    commit_grace: CommitGrace = field(default_factory=CommitGrace)

    def definition(
        self, step_id: str, *, execution_id: str | None = None, doing: str = "starting it"
    ) -> StepDefinition:
        """The step's registered definition, or UnknownStepError (naming the execution that
        needs it, ``doing`` what)."""
        return lookup(self.definitions, step_id, execution_id=execution_id, doing=doing)
