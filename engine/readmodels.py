"""Read models: the executions index following the log.

The runner reads the log in global order (``Backend.read_all`` pages): first catch-up, then
live, woken by the engine's notifier or its poll interval (``ReadModels.run`` runs in the
Engine's task group while ``async with engine`` is active), and folds each page into the
index (:mod:`.index_file`, or PostgreSQL's own tables: :mod:`.readmodel_store`) in one
transaction with its tracking position. Queries first catch the index up to the log's current
``max_position``, so a caller reads its own writes. While the runner runs, this process's
own commits are folded from :mod:`.index_feed` instead of being read back.

If the index is ahead of the log, or its first event is not the log's first event, it
belongs to another log (the file was replaced): it is dropped and rebuilt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from stepsource.adapters.ports import Backend
from stepsource.aggregates import events as ev
from stepsource.engine import rebuild_helpers
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
from stepsource.engine.encrypted_log import require_key
from stepsource.engine.index_feed import IndexFeed
from stepsource.engine.index_file import ExecutionsIndex
from stepsource.engine.index_reading import IndexBatch, Page, read_page
from stepsource.engine.notify import Notifier
from stepsource.engine.readmodel_store import EXECUTIONS_TABLE, StoredExecutionsIndex
from stepsource.engine.rebuild_helpers import HelperFailed, HelperPool, HelperSpec
from stepsource.engine.store import ExecutionStore, parse_execution_id
from stepsource.errors import StepsourceError, UsageError
from stepsource.projections.executions_index import STATUSES, IndexFilter
from stepsource.projections.summaries import ExecutionSummary, summarize

__all__ = ["ProgressCallback", "ReadModels", "RebuildReport"]

_logger = logging.getLogger("stepsource.readmodels")

T = TypeVar("T")

#: the live runner catches up at most this often (seconds); a query never waits for it
RUNNER_MIN_INTERVAL = 0.1

#: ``progress(position, target)``: the log position folded so far and the one aimed at
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class RebuildReport:
    """What a rebuild did: events folded, executions indexed, position reached, seconds, and
    the helper processes that read the log beside it (0: it read the log itself)."""

    events: int
    executions: int
    position: int
    seconds: float
    helpers: int = 0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float(self.events)


#: why a process without the key may not fold an encrypted log into the index
_UNKEYED = "the executions index would take every execution for damage"


class ReadModels:
    """Keeps the executions index caught up with one engine's log."""

    def __init__(
        self,
        store: ExecutionStore,
        path: str | None,
        *,
        batch_size: int = 500,
        rebuild_batch_size: int = 5000,
        gc_threshold: int | None = WORKER_THRESHOLD,
        helpers: HelperSpec | None = None,
    ) -> None:
        self.store = store
        #: how a catch-up of a large backlog (a rebuild, the first catch-up of an index kept
        #: in memory) reads the log in helper processes (None: it reads it itself)
        self.helpers = helpers
        #: helper processes started so far (a rebuild reports how many it started)
        self.helpers_started = 0
        self._helping: anyio.Event | None = None  # set when the running one ends
        #: this process's commits, folded without reading them back while the runner runs
        #: (:mod:`.index_feed`; only where a commit's events take consecutive positions)
        self.feed = IndexFeed() if store.backend.dense_positions else None
        # PostgreSQL keeps the index in its own database; the others in a local SQLite one
        kept = store.backend.readmodel_store(EXECUTIONS_TABLE)
        self.index: ExecutionsIndex | StoredExecutionsIndex
        self.index = ExecutionsIndex(path) if kept is None else StoredExecutionsIndex(kept)
        # an encrypted log's index keeps error types, not their (user-data) messages
        self.index.redact_errors = store.codec.encrypted
        self.batch_size = batch_size
        self.rebuild_batch_size = rebuild_batch_size
        #: the collector's youngest threshold while a catch-up folds (see .collector): a page
        #: of records is thousands of short-lived tuples, and a client engine (no worker
        #: pool) would otherwise run the default collector through a rebuild
        self.gc_threshold = gc_threshold

    def __repr__(self) -> str:
        return f"ReadModels({self.index.path or ':memory:'!r})"

    @property
    def backend(self) -> Backend:
        return self.store.backend

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    async def position(self) -> int:
        return await self._call(self.index.position)

    async def _first_stream(self) -> str | None:
        first = await self.backend.read_all(0, 1)
        return first[0].stream_id if first else None

    async def _check_same_log(self) -> int:
        """Drop an index that belongs to another log (ahead of it, or another first event);
        return the log's end position."""
        log_end = await self.backend.max_position()  # the log first: its errors come first
        tracked = await self.position()
        if tracked > log_end:  # read the log's end again after ``tracked``: the log grows
            log_end = await self.backend.max_position()
        if tracked == 0:
            self.index.checked_origin = True
            return log_end
        stale = tracked > log_end
        if not stale and not self.index.checked_origin:
            stale = await self._call(self.index.origin) != await self._first_stream()
        if stale:
            _logger.warning(
                "%r was built from another log (tracked position %d, log end %d): rebuilding",
                self.index,
                tracked,
                log_end,
            )
            await self._call(self.index.reset)
        self.index.checked_origin = True
        return log_end

    async def catch_up(
        self,
        until: int | None = None,
        *,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Fold the log into the index up to position ``until`` (default: the log's end now);
        return the number of events this call folded."""
        with tuned_collector(self.gc_threshold):
            return await self._catch_up(until, batch_size, progress)

    async def _catch_up(
        self, until: int | None, batch_size: int | None, progress: ProgressCallback | None
    ) -> int:
        log_end = await self._check_same_log()
        target = log_end if until is None else until
        size = batch_size or self.batch_size
        codec = self.store.codec
        feed = self.feed

        async def next_page(after: int) -> Page:
            page = None if feed is None else feed.page(after, size, target)
            if page is None:  # read from the log (this process's own commits need not be)
                await require_key(self.store, _UNKEYED)
                page = await read_page(self.backend, codec, after, size, target)
                if feed is not None:
                    feed.read(page.end)
            return page

        folded = 0
        position = await self.position()
        if self._helpers_pay(target - position):  # a large backlog: a rebuild, a first start
            await require_key(self.store, _UNKEYED)
            folded, position = await self._catch_up_in_helpers(target, progress)
        while position < target:
            done, finished = await self._fold(next_page, position, target, progress)
            folded += done
            if finished:
                break
            # the fold did not end (cancelled), or another process moved the index first:
            # go on from where it is now
            position = await self.position()
        return folded

    async def _fold(
        self,
        next_page: Callable[[int], Awaitable[Page]],
        position: int,
        target: int,
        progress: ProgressCallback | None,
    ) -> tuple[int, bool]:
        """Fold the pages ``next_page(after)`` gives, from ``position`` on, until ``target``
        or the log's end; return the events folded and whether it ended there (False: the
        fold was cancelled or another process moved the index, which is left as it is)."""
        folded = 0
        ahead = await next_page(position)
        while position < target and ahead.events:
            page = ahead
            applied: list[bool] = []
            origin = page.first if position == 0 else None

            async def apply(
                after: int = position,
                batch: IndexBatch = page.batch,
                first: str | None = origin,
                out: list[bool] = applied,
            ) -> None:
                out.append(await self._call(self.index.apply, after, batch, first))

            # the next page is read and decoded while this one is folded in a thread; an error
            # of either is raised as itself (a BackendUnavailableError the runner logs and
            # retries), not inside the task group's ExceptionGroup
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(apply)
                    if page.end < target:
                        ahead = await next_page(page.end)
            except ExceptionGroup as group:  # why: raised again as the one error inside it
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            if not applied:  # the fold did not end (cancelled): let a cancellation through
                await anyio.lowlevel.checkpoint()
                return folded, False
            if not applied[0]:  # another process moved the index first
                return folded, False
            folded += page.events  # a batch may fold a run of events as one
            position = page.end
            if progress is not None:
                progress(position, target)
        return folded, True

    async def rebuild(self, progress: ProgressCallback | None = None) -> RebuildReport:
        """Drop the index and fold the whole log again (the log as it is now)."""
        started = time.perf_counter()
        await self._call(self.index.reset)
        target = await self.backend.max_position()
        if progress is not None:
            progress(0, target)
        before = self.helpers_started
        events = await self.catch_up(target, batch_size=self.rebuild_batch_size, progress=progress)
        return RebuildReport(
            events=events,
            executions=await self._call(self.index.count),
            position=await self.position(),
            seconds=time.perf_counter() - started,
            helpers=self.helpers_started - before,
        )

    def _helpers_pay(self, backlog: int) -> bool:
        """Whether a catch-up of ``backlog`` positions is worth starting helper processes
        (only where positions count events: helpers are handed ranges of positions)."""
        spec = self.helpers
        return (
            spec is not None
            and spec.processes > 0
            and self.backend.dense_positions
            and backlog > 0  # an empty backlog never starts helpers, whatever HELPERS_FROM says
            and backlog >= rebuild_helpers.HELPERS_FROM
        )

    async def _catch_up_in_helpers(
        self, target: int, progress: ProgressCallback | None
    ) -> tuple[int, int]:
        """Fold the log up to ``target`` with pages read and checked by helper processes
        (:mod:`.rebuild_helpers`), one such catch-up at a time (another one waits for it, then
        folds what is left itself); return the events folded and the position reached. A
        helper that fails only ends this: the caller folds the rest itself."""
        while (helping := self._helping) is not None:
            await helping.wait()
        done = self._helping = anyio.Event()  # claimed before any await: one at a time
        started = 0
        try:
            position = await self.position()
            spec = self.helpers
            if spec is None or not self._helpers_pay(target - position):
                return 0, position
            pool = HelperPool(spec, self.store.codec, position, target, self.rebuild_batch_size)
            try:
                async with pool:
                    folded, _ = await self._fold(pool.next_page, position, target, progress)
            except HelperFailed as failed:
                _logger.warning("the catch-up goes on without helper processes: %s", failed)
                folded = pool.events_until(int(await self.position()))
            finally:
                started = pool.started
        finally:
            self.helpers_started += started
            self._helping = None
            done.set()
        return folded, int(await self.position())

    async def executions(
        self,
        *,
        status: str | None = None,
        step_id: str | None = None,
        flow_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        cursor: str | None = None,
        key: str | None = None,
    ) -> list[ExecutionSummary]:
        """Query the index after catching it up to the log's end (read-your-writes)."""
        _check_query(status, since, limit, offset)
        after = None if cursor is None else parse_execution_id(cursor)
        await self.catch_up()
        found = await anyio.to_thread.run_sync(
            lambda: self.index.query(
                IndexFilter(status, step_id, flow_id, key, since),
                limit=limit,
                offset=offset,
                cursor=after,
            )
        )
        if found is None:
            raise UsageError(
                f"cursor {cursor!r} is not an execution in the index",
                hint="Pass the execution_id of the last row of the previous page",
            )
        return found

    async def refresh(self, events: Sequence[ev.ExecutionEvent]) -> None:
        """Fold one execution's whole log into its row again (its events, decoded)."""
        summaries: dict[str, ExecutionSummary] = {}
        for event in events:
            summarize(summaries, event)
        for summary in summaries.values():
            await self._call(self.index.replace, summary)

    async def dump(self) -> list[tuple[Any, ...]]:
        """Every row of the index (after catching up), oldest first."""
        await self.catch_up()
        return await self._call(self.index.dump)

    async def run(
        self,
        wake: Notifier,
        poll_interval: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the log: catch up, then fold new events as they come, until cancelled."""
        feed = self.feed
        if feed is not None:  # told of this process's commits while it follows the log
            self.store.appended = feed.appended
        task_status.started()
        interval = max(poll_interval, RUNNER_MIN_INTERVAL)
        delay = interval
        try:
            while True:
                try:
                    await self.catch_up()
                    delay = interval
                except StepsourceError as error:  # the backend is away: try again later
                    _logger.warning("the read-model runner could not catch up: %s", error)
                    delay = min(delay * 2, 30.0)
                await wake.wait(delay)
                # a burst of changes is folded in one go: queries catch up by themselves
                await anyio.sleep(RUNNER_MIN_INTERVAL / 2)
        finally:
            if feed is not None and self.store.appended == feed.appended:
                self.store.appended = None
                feed.clear()

    async def aclose(self) -> None:
        await self._call(self.index.close)


def _check_query(status: str | None, since: datetime | None, limit: int, offset: int) -> None:
    if status is not None and status not in STATUSES:
        raise UsageError(
            f"unknown status {status!r}",
            hint=f"A status is one of: {', '.join(STATUSES)}",
        )
    if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
        raise UsageError(
            f"since must be a timezone-aware datetime, not {since!r}",
            hint="For example datetime(2025, 1, 1, tzinfo=UTC)",
        )
    for name, value, low in (("limit", limit, 0), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an int >= {low}, not {value!r}")
