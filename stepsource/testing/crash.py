"""``crash_everywhere``: prove a step handler survives a crash anywhere.

The step runs once uninterrupted on a fresh in-memory log. Then it runs again on a fresh log
with the worker "killed" — the actor torn down with no cleanup, its lease left held, as a
SIGKILL would leave it — at every crash point of that run, and a fresh engine over the same
log resumes it. The crash points are

- every **commit**: the worker dies right after commit k is durable (the only states a log
  can be in, since the events of one commit are stored atomically), and
- every **operation**: the worker dies as operation k of the handler begins, so whatever the
  operations before it left buffered (under ``durability="boundary"``) is lost with it.

Each resumed run must end with the output, state, history and checkpoints of the
uninterrupted run (timestamps, lease and worker details aside), and no ``ctx.do`` body whose
result was recorded before the crash may run again.

Every run uses the same execution id but a different engine seed, so a value the engine draws
from a per-process source without recording it (a checkpoint id that is not derived from the
operation, say) shows up as a mismatch. Values a handler draws through the context
(``ctx.uuid4()``, ``ctx.random()``, ``ctx.now()``) are recorded, and are compared by which
recorded draw they are (the n-th ``uuid4``), not by their value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from stepsource.adapters.memory import MemoryBackend
from stepsource.adapters.ports import (
    Backend,
    Commit,
    InboxItem,
    KVEntry,
    Lease,
    RecordedEvent,
    Snapshot,
)
from stepsource.aggregates import events as ev
from stepsource.aggregates.execution import TERMINAL_STATUSES
from stepsource.engine.clock import Clock
from stepsource.engine.definitions import Durability
from stepsource.engine.engine import Engine
from stepsource.errors import ResultTimeout, UsageError

__all__ = ["BoundaryResult", "CrashReport", "ReplayMismatch", "crash_everywhere"]

_SEED = b"stepsource.testing.crash_everywhere"
_EXECUTION_ID = "00000000-0000-4000-8000-00000000c0de"
#: the recorded draws a handler makes through its context, compared by their order
_DRAWN = ("uuid4", "random", "now")


class ReplayMismatch(AssertionError):
    """A resumed run ended differently from the uninterrupted one (or re-ran a recorded body)."""


class _Crash(BaseException):
    pass


@dataclass(frozen=True)
class BoundaryResult:
    boundary: int
    """The commit after which (``kind="commit"``, 1 = only StepScheduled) or the operation
    at whose start (``kind="operation"``, from 1) the worker died."""
    last_version: int
    last_event: str
    bodies_rerun: tuple[str, ...]
    """ctx.do bodies that ran again after the crash (allowed only if not yet recorded)."""
    reached: bool = True
    """False when this run ended before reaching the crash point (flows whose children
    finish in another order can record fewer wake-ups); its outcome was still compared."""
    kind: str = "commit"
    """``commit`` or ``operation``."""
    operation: str = ""
    """For ``kind="operation"``: the operation that was about to begin."""


@dataclass(frozen=True)
class CrashReport:
    step_id: str
    commits: int
    events: int
    boundaries: tuple[BoundaryResult, ...] = field(default=())
    operations: int = 0
    """Recording operations the uninterrupted run began (each one a crash point)."""
    durability: str = "boundary"

    @property
    def boundaries_tried(self) -> int:
        """Commit crash points tried (every commit of the run but its last)."""
        return sum(1 for b in self.boundaries if b.kind == "commit")

    @property
    def operations_tried(self) -> int:
        return sum(1 for b in self.boundaries if b.kind == "operation")

    @property
    def crashes(self) -> int:
        """Boundaries where the worker was actually killed and the run resumed."""
        return sum(1 for b in self.boundaries if b.reached)


class _CrashingBackend(Backend):
    """Delegates to a real backend; dies right after the ``crash_after``-th durable append."""

    def __init__(self, inner: Backend, crash_after: int | None) -> None:
        self.inner = inner
        self.crash_after = crash_after
        self.appends = 0
        self.dead = anyio.Event()
        self.max_commit_bytes = inner.max_commit_bytes

    def _alive(self) -> None:
        if self.dead.is_set():
            raise _Crash

    async def open(self) -> None:
        await self.inner.open()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def append(self, commit: Commit) -> int:
        self._alive()
        position = await self.inner.append(commit)
        if commit.events:
            self.appends += 1
        if self.crash_after is not None and self.appends >= self.crash_after:
            self.dead.set()
            raise _Crash
        return position

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        self._alive()
        return await self.inner.read_stream(stream_id, from_version, to_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        self._alive()
        return await self.inner.read_all(after_position, limit)

    async def stream_version(self, stream_id: str) -> int:
        self._alive()
        return await self.inner.stream_version(stream_id)

    async def max_position(self) -> int:
        self._alive()
        return await self.inner.max_position()

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        self._alive()
        return await self.inner.lease(worker_id, step_ids, now_ms, lease_ms, limit)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        self._alive()
        return await self.inner.renew(worker_id, stream_ids, now_ms, lease_ms)

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        self._alive()  # a killed worker releases nothing
        await self.inner.release(worker_id, stream_id, due_ms)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        self._alive()
        return await self.inner.next_due_ms(step_ids)

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        self._alive()
        return await self.inner.post(stream_id, kind, name, data, now_ms)

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        self._alive()
        return await self.inner.inbox(stream_id, after_id, limit)

    async def reserve_inbox_ids(self, above: int) -> None:
        self._alive()
        await self.inner.reserve_inbox_ids(above)

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        self._alive()
        await self.inner.publish_definition(step_id, version, data)

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        self._alive()
        return await self.inner.published_definition(step_id)

    async def kv_get(self, key: str, now_ms: int) -> KVEntry | None:
        self._alive()
        return await self.inner.kv_get(key, now_ms)

    async def kv_put(
        self, key: str, data: bytes, now_ms: int, ttl_ms: int | None = None
    ) -> KVEntry:
        self._alive()
        return await self.inner.kv_put(key, data, now_ms, ttl_ms)

    async def kv_compare_and_set(
        self,
        key: str,
        expected_revision: int | None,
        data: bytes,
        now_ms: int,
        ttl_ms: int | None = None,
    ) -> KVEntry | None:
        self._alive()
        return await self.inner.kv_compare_and_set(key, expected_revision, data, now_ms, ttl_ms)

    async def kv_delete(self, key: str, now_ms: int) -> None:
        self._alive()
        await self.inner.kv_delete(key, now_ms)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._alive()
        await self.inner.save_snapshot(snapshot)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        self._alive()
        return await self.inner.latest_snapshot(stream_id, max_version)


def _crashed(error: BaseException) -> bool:
    if isinstance(error, _Crash):
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(
            _crashed(inner) or isinstance(inner, anyio.get_cancelled_exc_class())
            for inner in error.exceptions
        )
    return False


def _drawn(events: Sequence[Any]) -> dict[tuple[str, str], str]:
    """Each value the handler drew through its context, by its JSON text, mapped to which
    draw it was (``<uuid4 #2>``)."""
    names: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    for event in events:
        kind = getattr(event, "kind", None)
        if type(event).__name__ != "ValueRecorded" or kind not in _DRAWN:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        value = event.value
        names.setdefault((type(value).__name__, str(value)), f"<{kind} #{counts[kind]}>")
    return names


def _normalized(value: Any, drawn: dict[tuple[str, str], str]) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v, drawn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalized(v, drawn) for v in value]
    if isinstance(value, str | float):
        return drawn.get((type(value).__name__, str(value)), value)
    return value


async def _outcome(engine: Engine, execution_id: str) -> dict[str, Any]:
    """What a user sees of a finished execution, without timestamps and worker details, and
    with the values drawn through the context named by their order."""
    handle = engine.get_handle(execution_id)
    status = (await engine.describe(execution_id)).status
    output: Any
    if status not in TERMINAL_STATUSES:
        output = {"not ended": status}  # resting (waiting): nothing to wait for
    else:
        try:
            output = {"output": await handle.result(timeout=5)}
        except AssertionError:
            raise
        except Exception as error:  # noqa: BLE001 - a failed step's outcome is its error text
            output = {"error": type(error).__name__, "message": str(error)}
    history = []
    for entry in await engine.history_of(execution_id):
        details = dict(entry.details)
        if entry.type == "started":
            details.pop("worker_id", None)
        if entry.type == "retry":
            details.pop("retry_at", None)
        history.append((entry.type, details))
    checkpoints = [
        (c.id, c.metadata, c.state, c.cursor, c.items_processed, c.accumulated_results)
        for c in await engine.checkpoints_of(execution_id)
    ]
    drawn = _drawn(await engine.events(execution_id))
    return {
        part: _normalized(value, drawn)
        for part, value in {
            "output": output,
            "state": await engine.state_of(execution_id),
            "history": history,
            "checkpoints": checkpoints,
        }.items()
    }


def _short(value: Any, width: int = 300) -> str:
    text = orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


async def _compare(expected: dict[str, Any], observed: dict[str, Any], where: str) -> None:
    for part in ("output", "state", "history", "checkpoints"):
        if observed[part] != expected[part]:
            raise ReplayMismatch(
                f"{where}, the {part} differs from the uninterrupted run:\n"
                f"  expected {_short(expected[part])}\n  got      {_short(observed[part])}"
            )


@dataclass
class _Run:
    """One run of the step on a log: its seed, and what it saw happen."""

    backend: Backend
    seed: bytes
    bodies: list[str] = field(default_factory=list)
    #: each body run as (its execution, its name): a child's ``ctx.do`` may share a name
    body_runs: list[tuple[str, str]] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)
    crash_at_operation: int | None = None
    dead: anyio.Event | None = None

    def body(self, execution_id: str, name: str) -> None:
        self.bodies.append(name)
        self.body_runs.append((execution_id, name))

    def operation(self, _execution_id: str, name: str) -> None:
        self.operations.append(name)
        if self.crash_at_operation is not None and len(self.operations) >= self.crash_at_operation:
            assert self.dead is not None
            self.dead.set()
            raise _Crash


async def _run(
    base: Engine,
    run: _Run,
    step_id: str,
    input: Mapping[str, Any] | None,
    *,
    start: bool,
    clock: Clock | None,
    timeout: float,
    durability: Durability,
) -> None:
    engine = base.derive(
        backend=run.backend,
        workers=1,
        lease_seconds=0.1,
        seed=run.seed,
        poll_interval=0.005,
        clock=clock,
        durability=durability,
    )
    engine.on_substep_body = run.body
    engine.on_operation = run.operation
    async with engine:
        handle = (
            await engine.start(step_id, input, execution_id=_EXECUTION_ID)
            if start
            else engine.get_handle(_EXECUTION_ID)
        )
        deadline = anyio.current_time() + timeout
        while True:
            remaining = deadline - anyio.current_time()
            try:
                await handle.result(timeout=max(min(_LOOK_SECONDS, remaining), 0.001))
                return
            except AssertionError:
                raise
            except ResultTimeout:
                pass
            except Exception:  # noqa: BLE001 - a failed step is an outcome to compare
                return
            if await _resting(engine, step_id, start, clock, remaining):
                return
            if remaining <= 0:
                status = (await engine.describe(_EXECUTION_ID)).status
                if status in _UNFINISHED:  # neither ended nor resting: nothing fair to compare
                    raise ReplayMismatch(
                        f"the run of {step_id!r} neither ended nor waited within "
                        f"timeout={timeout} s (its status: {status})"
                        + ("" if start else ", resumed after a crash")
                        + "; a longer step needs a larger timeout"
                    )
                return


#: how often a run not yet ended is looked at (parked, or resting past its time bound)
_LOOK_SECONDS = 0.05


async def _resting(
    engine: Engine, step_id: str, start: bool, clock: Clock | None, remaining: float
) -> bool:
    """Whether the run, not ended, will not change before its time bound: on the real clock,
    no execution of the log (the step's, its children's) may be leased before then (each
    waits for a message or a timer due later, none runs). A run the engine parked is a
    :class:`ReplayMismatch` saying why (the divergence it found)."""
    events = await engine.events(_EXECUTION_ID)
    last = events[-1] if events else None
    if isinstance(last, ev.StepParked):
        raise ReplayMismatch(
            f"the run of {step_id!r}"
            + ("" if start else ", resumed after a crash,")
            + f" was parked by the engine: {last.reason}"
        )
    if clock is not None or not isinstance(last, ev.StepSuspended):
        return False  # a test clock may jump to the next timer
    due = await engine.store.backend.next_due_ms(engine.step_ids())
    return due is None or due > engine.clock.now_ms() + remaining * 1000


#: statuses a run that ran out of time may not be compared in: it is still going
_UNFINISHED = frozenset({"scheduled", "executing"})


def _seed(n: int) -> bytes:
    return _SEED + n.to_bytes(4, "big")


async def crash_everywhere(
    engine: Engine,
    step_id: str,
    input: Mapping[str, Any] | None = None,
    *,
    clock: Clock | None = None,
    timeout: float = 60.0,
    durability: Durability | None = None,
) -> CrashReport:
    """Run ``step_id`` uninterrupted, then crashed at every commit and at every operation,
    each time resumed; compare.

    Uses the steps and services registered on ``engine`` (its URL is ignored: every run gets
    a fresh ``memory://`` log) and its durability mode unless ``durability`` is given. Raises
    :class:`ReplayMismatch` on the first difference, naming the crash point, the event before
    it and what differed; returns a report otherwise.
    """
    engine.definition(step_id)  # UnknownStepError before anything runs
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise UsageError(
            f"crash_everywhere needs a timeout of seconds > 0, not {timeout!r}",
            step_id=step_id,
            hint="It bounds each run of the step; leave the default (60) or give more",
        )
    mode: Durability = durability or engine.durability
    seeds = iter(range(1, 1 << 30))
    reference_log = _CrashingBackend(MemoryBackend(), crash_after=None)
    reference = _Run(reference_log, _seed(next(seeds)))
    await _run(
        engine,
        reference,
        step_id,
        input,
        start=True,
        clock=clock,
        timeout=timeout,
        durability=mode,
    )
    observer = engine.derive(backend=reference_log.inner, workers=0)
    expected = await _outcome(observer, _EXECUTION_ID)
    commits = reference_log.appends
    events = await observer.events(_EXECUTION_ID)
    points = [("commit", k) for k in range(1, commits)]
    points += [("operation", k) for k in range(1, len(reference.operations) + 1)]
    results: list[BoundaryResult] = []
    for kind, point in points:
        inner = MemoryBackend()
        crashing = _CrashingBackend(inner, crash_after=point if kind == "commit" else None)
        before = _Run(crashing, _seed(next(seeds)), dead=crashing.dead)
        if kind == "operation":
            before.crash_at_operation = point
        try:
            await _run(
                engine,
                before,
                step_id,
                input,
                start=True,
                clock=clock,
                timeout=timeout,
                durability=mode,
            )
        except BaseException as error:
            if not _crashed(error):
                raise
        view = engine.derive(backend=inner, workers=0)
        operation = before.operations[-1] if kind == "operation" and before.operations else ""
        label = f"{kind} {point}" + (f" ({operation})" if operation else "")
        if not crashing.dead.is_set():
            # a flow whose children finish in a different order can make fewer commits:
            # this run ended before the crash point; its outcome must still be the same
            await _compare(
                expected,
                await _outcome(view, _EXECUTION_ID),
                f"(a run that ended before its crash point, {label})",
            )
            results.append(
                BoundaryResult(
                    point, 0, "(not reached)", tuple(before.bodies), False, kind, operation
                )
            )
            continue
        at_crash = await view.events(_EXECUTION_ID)
        last = at_crash[-1]
        # the bodies recorded by the crash, of this execution and of the children whose
        # bodies ran before it
        recorded: set[tuple[str, str]] = set()
        for execution_id in {_EXECUTION_ID} | {eid for eid, _ in before.body_runs}:
            recorded |= {
                (execution_id, str(getattr(e, "name", "")))
                for e in await view.events(execution_id)
                if type(e).__name__ == "SubStepCompleted"
            }
        after = _Run(inner, _seed(next(seeds)))
        await _run(
            engine,
            after,
            step_id,
            input,
            start=False,
            clock=clock,
            timeout=timeout,
            durability=mode,
        )
        where = (
            f"after a crash at {label} boundary, durability={mode!r} (right after event "
            f"{last.originator_version}, {type(last).__name__})"
        )
        rerun = sorted(
            name if eid == _EXECUTION_ID else f"{name} (of child {eid})"
            for eid, name in set(after.body_runs) & recorded
        )
        if rerun:
            raise ReplayMismatch(
                f"{where}, the recorded ctx.do bodies {rerun} ran again: a recorded result must "
                "be returned from the log"
            )
        await _compare(expected, await _outcome(view, _EXECUTION_ID), where)
        results.append(
            BoundaryResult(
                boundary=point,
                last_version=last.originator_version,
                last_event=type(last).__name__,
                bodies_rerun=tuple(after.bodies),
                kind=kind,
                operation=operation,
            )
        )
    return CrashReport(
        step_id=step_id,
        commits=commits,
        events=len(events),
        boundaries=tuple(results),
        operations=len(reference.operations),
        durability=mode,
    )
