"""The NATS backend's work queue: the queue bucket, one key per queued execution, and its
mirror in memory.

Rows are changed by compare-and-set on the key's revision, so a lease is atomic across
processes. Each object mirrors the queue bucket in memory and catches up (one batched direct
get of what changed) before it leases, answers ``next_due_ms`` or checks a commit's lease; its
own writes enter the mirror at once. A commit's lease check shares one catch-up with the
checks of concurrent commits, and the catch-up sends their messages itself
(:meth:`NatsQueue.publish_leased`). See :mod:`stepsource.adapters.nats` for why the parts
that are not atomic with a commit are safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from stepsource.adapters._rules import queued_due_ms, wake_ms
from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.wire import (
    BATCH,
    QueueRow,
    Stored,
    Transient,
    decode_row,
    decode_token,
    encode_row,
)
from stepsource.adapters.ports import Commit, Lease
from stepsource.errors import CorruptLogError

__all__ = ["NatsQueue", "NotHolder"]


class NotHolder(Exception):
    """The lease check of :meth:`NatsQueue.publish_leased` failed: ``holder`` holds it."""

    def __init__(self, holder: str | None) -> None:
        super().__init__(holder)
        self.holder = holder


class _Leased:
    """A commit's message to publish once its lease check passes (see
    :meth:`NatsQueue.publish_leased`)."""

    __slots__ = ("answer", "headers", "owner", "payload", "stream_id", "subject")

    def __init__(
        self,
        stream_id: str,
        owner: str,
        message: tuple[str, bytes, dict[str, str]],
        answer: asyncio.Future[Any],
    ) -> None:
        self.stream_id, self.owner, self.answer = stream_id, owner, answer
        self.subject, self.payload, self.headers = message


def _unconfirmed(leased: Sequence[_Leased]) -> None:
    """Tell these commits that their lease check could not be confirmed (nothing was sent)."""
    for item in leased:
        if not item.answer.done():
            item.answer.set_result(None)


class _Checks:
    """The lease checks of one event loop waiting for the queue mirror to catch up, and the
    catch-ups in flight for them (see :meth:`NatsQueue._mirror_current`)."""

    __slots__ = ("line", "loop", "rounds", "starting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.line: list[asyncio.Future[bool] | _Leased] = []  # for the catch-up to start
        self.starting = False  # whether a task that will take the line is on its way
        self.rounds: set[asyncio.Task[None]] = set()  # catch-ups in flight


class NatsQueue:
    """The work queue's rows, their mirror, leases and lease checks, over :class:`JetStream`."""

    def __init__(self, js: JetStream) -> None:
        self.js = js
        self.connection = js.connection
        self.layout = js.layout
        self._rows: dict[str, tuple[int, QueueRow | None]] = {}  # the mirror: revision, row
        self._rows_seen = 0  # the queue bucket's stream sequence the mirror has read up to
        self._checks: _Checks | None = None  # lease checks waiting for the mirror

    # -- the mirror -------------------------------------------------------------------------
    def _mirror(self, stream_id: str, revision: int, row: QueueRow | None) -> None:
        known = self._rows.get(stream_id)
        if known is None or known[0] < revision:
            self._rows[stream_id] = (revision, row)

    @staticmethod
    def _row_of(stored: Stored) -> QueueRow | None:
        if stored.headers.get("KV-Operation") in ("DEL", "PURGE") or not stored.data:
            return None
        try:
            return decode_row(stored.data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptLogError(
                f"the queue entry {stored.subject} is not a stepsource queue row ({exc})",
                hint="Something else wrote into this bucket: use another ?stream= name",
            ) from None

    async def _fetch_row(self, stream_id: str) -> tuple[int, QueueRow | None] | None:
        """The execution's queue row and revision as the server has it now (or None)."""
        stored = await self.js.get(
            self.layout.queue_stream, {"last_by_subj": self.layout.row_subject(stream_id)}
        )
        if stored is None:
            return None
        row = self._row_of(stored)
        self._mirror(stream_id, stored.seq, row)
        return stored.seq, row

    async def _sync_queue(self) -> None:
        """Catch the mirror up with every queue change since it last looked."""
        prefix = f"$KV.{self.layout.queue_bucket}."
        while True:
            batch, more = await self.js.batch(
                self.layout.queue_stream, {"seq": self._rows_seen + 1, "batch": BATCH}
            )
            for stored in batch:
                self._mirror(
                    decode_token(stored.subject.removeprefix(prefix)),
                    stored.seq,
                    self._row_of(stored),
                )
                self._rows_seen = max(self._rows_seen, stored.seq)
            if not batch or not more:
                return

    async def lease_holder(self, stream_id: str) -> str | None:
        """Who holds the execution's lease as the server has it now: an answer at least as
        current as a read of its queue row sent after this call began (the lease check of a
        commit). Concurrent checks share one catch-up of the mirror (:meth:`_mirror_current`)
        instead of reading one row each."""
        if not await self._mirror_current():
            return await self.row_holder(stream_id)
        return self._mirrored_holder(stream_id)

    def _mirrored_holder(self, stream_id: str) -> str | None:
        known = self._rows.get(stream_id)
        return None if known is None or known[1] is None else known[1].lease_owner

    async def row_holder(self, stream_id: str) -> str | None:
        """Who holds the execution's lease, read from its queue row."""
        fetched = await self._fetch_row(stream_id)
        return None if fetched is None or fetched[1] is None else fetched[1].lease_owner

    async def _mirror_current(self) -> bool:
        """Return once the queue mirror holds every queue write the server stored before
        this call began: True, or False if that could not be confirmed (the caller then
        reads the row itself).

        The callers of one turn of the event loop share one catch-up: the first starts a
        task (:meth:`_check_round`), which takes every caller waiting by the time it runs
        and only then sends its probe (:meth:`catch_up`), so no answer is older than
        its call. A caller arriving after that starts the next one without waiting for the
        probe in flight. Concurrent commits thus share one probe of the queue bucket, where
        each would read its own row."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._wait_for_check(loop, waiter)
        return await waiter

    async def publish_leased(
        self, stream_id: str, owner: str, message: tuple[str, bytes, dict[str, str]]
    ) -> int | None:
        """Publish ``(subject, payload, headers)`` if ``owner`` holds the execution's lease,
        checked as :meth:`lease_holder` checks it, and return its sequence; None if the
        check could not be confirmed (nothing was sent: the caller reads the row itself).
        :class:`NotHolder` if another worker holds it (nothing was sent); any other error
        comes after the check passed, from the publish (as :meth:`JetStream.publish` raises them).

        The catch-up task sends the message itself right after the check, so the commit
        wakes once, for its acknowledgement, instead of once for the check and once more."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._wait_for_check(loop, _Leased(stream_id, owner, message, answer))
        try:
            outcome = await answer
        except TimeoutError:
            raise Transient("no acknowledgement in time") from None
        if outcome is None or isinstance(outcome, NotHolder):
            if outcome is not None:
                raise outcome
            return None
        return self.js.ack_sequence(outcome)

    def _wait_for_check(
        self, loop: asyncio.AbstractEventLoop, waiting: asyncio.Future[bool] | _Leased
    ) -> None:
        checks = self._checks
        if checks is None or checks.loop is not loop:  # a catch-up serves its own loop only
            checks = self._checks = _Checks(loop)
        checks.line.append(waiting)
        if not checks.starting:
            checks.starting = True
            task = loop.create_task(self._check_round(checks))
            checks.rounds.add(task)
            task.add_done_callback(checks.rounds.discard)

    async def drop_checks(self) -> None:
        """Stop the catch-ups in flight (the backend closes): their lease checks read their
        rows instead, on the connection made next."""
        checks, self._checks = self._checks, None
        if checks is None or checks.loop is not asyncio.get_running_loop():
            return
        for task in list(checks.rounds):
            task.cancel()
        await asyncio.gather(*checks.rounds, return_exceptions=True)
        _unconfirmed([w for w in checks.line if isinstance(w, _Leased)])
        for waiting in checks.line:
            if not isinstance(waiting, _Leased) and not waiting.done():
                waiting.set_result(False)

    async def _check_round(self, checks: _Checks) -> None:
        """Catch the mirror up for every caller of :meth:`_mirror_current` and
        :meth:`publish_leased` waiting now; then answer them, and send the messages of
        those whose lease check passed."""
        line, checks.line = checks.line, []
        checks.starting = False
        current = False
        try:
            current = await self.catch_up()
        except Exception:  # noqa: BLE001 - each caller reads its row, and sees the error
            current = False
        finally:  # also when cancelled (by aclose): nobody is left waiting
            leased: list[_Leased] = []
            for waiting in line:
                if isinstance(waiting, _Leased):
                    leased.append(waiting)
                elif not waiting.done():
                    waiting.set_result(current)
            if not current:  # cancelled, or the catch-up failed: each reads its row
                _unconfirmed(leased)
        if current:
            await self._send_leased(leased)

    async def _send_leased(self, leased: list[_Leased]) -> None:
        """Send the messages of the commits whose lease check passes; answer the others."""
        for at, item in enumerate(leased):
            if item.answer.done():  # its commit was cancelled: nothing is sent
                continue
            holder = self._mirrored_holder(item.stream_id)
            if holder != item.owner:
                item.answer.set_result(NotHolder(holder))
                continue
            try:
                await self.connection.send(item.subject, item.payload, item.headers, item.answer)
            except asyncio.CancelledError:  # by aclose: the rest read their rows
                if not item.answer.done():  # sent or not: its commit publishes it again
                    item.answer.set_exception(Transient("the backend closed while sending"))
                _unconfirmed(leased[at + 1 :])
                raise
            except Exception as exc:  # noqa: BLE001 - its commit raises it
                if not item.answer.done():
                    item.answer.set_exception(exc)

    async def catch_up(self) -> bool:
        """Bring the mirror up to the queue bucket's state now; whether that is confirmed.

        The probe asks for the first message after the last one the mirror read (every
        message up to ``_rows_seen`` is in the mirror, or replaced there by a later write
        of its key). None means the mirror is current as of the probe; else the mirror reads
        on from there. On one replica that read is as current as the probe; on several it
        may come from a replica that lags, so the leader is asked once more."""
        stream = self.layout.queue_stream
        every = f"$KV.{self.layout.queue_bucket}.>"
        probe = await self.js.get(stream, {"seq": self._rows_seen + 1, "next_by_subj": every})
        if probe is None:
            return True
        # nothing lies between the messages the mirror had read when the probe was sent and
        # the probe's (``_rows_seen`` may have grown since: other catch-ups run beside this)
        self._mirror(
            decode_token(probe.subject.removeprefix(every[:-1])), probe.seq, self._row_of(probe)
        )
        self._rows_seen = max(self._rows_seen, probe.seq)
        await self._sync_queue()
        if self.js.replicas == 1:
            return True
        return (
            await self.js.get(stream, {"seq": self._rows_seen + 1, "next_by_subj": every}) is None
        )

    async def _put_row(
        self, stream_id: str, row: QueueRow | None, expect: int | None
    ) -> int | None:
        """Write (or, with None, delete) the row; with ``expect``, only if the row's revision
        is still that (0: no row). The new revision, or None if another write came first."""
        headers = {"KV-Operation": "DEL"} if row is None else {}
        subject = self.layout.row_subject(stream_id)
        payload = b"" if row is None else encode_row(row)
        if expect is None:
            revision: int | None = await self.js.publish(subject, payload, headers)
        else:
            revision = await self.js.publish_if(
                self.layout.queue_stream, subject, payload, headers, expect
            )
        if revision is not None:
            self._mirror(stream_id, revision, row)
        return revision

    async def _current(self, stream_id: str) -> tuple[int, QueueRow | None]:
        """The mirrored row (a guess for compare-and-set), else the server's."""
        known = self._rows.get(stream_id)
        if known is not None:
            return known
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def lease(
        self, worker_id: str, step_ids: Sequence[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        wanted = set(step_ids)
        if not wanted or limit <= 0:
            return []
        result: list[Lease] = await self.connection.guard(
            self._lease(worker_id, wanted, now_ms, lease_ms, limit), "lease executions"
        )
        return result

    async def _lease(
        self, worker_id: str, wanted: set[str], now_ms: int, lease_ms: int, limit: int
    ) -> list[Lease]:
        await self._sync_queue()
        candidates = sorted(
            (-row.priority, row.due_ms, stream_id)
            for stream_id, (_, row) in self._rows.items()
            if row is not None and row.step_id in wanted and row.runnable(now_ms)
        )
        leases: list[Lease] = []
        expires = now_ms + lease_ms
        for _, _, stream_id in candidates:
            if len(leases) >= limit:
                break
            revision, row = self._rows[stream_id]
            while row is not None and row.step_id in wanted and row.runnable(now_ms):
                mine = replace(row, lease_owner=worker_id, lease_expires_ms=expires)
                if await self._put_row(stream_id, mine, revision) is not None:
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
                revision, row = await self._current_after_miss(stream_id)
                if row == mine:  # our own write, whose ack was lost
                    leases.append(Lease(stream_id, row.step_id, row.priority, expires))
                    break
        return leases

    async def _current_after_miss(self, stream_id: str) -> tuple[int, QueueRow | None]:
        fetched = await self._fetch_row(stream_id)
        return fetched if fetched is not None else (0, None)

    async def renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        result: list[str] = await self.connection.guard(
            self._renew(worker_id, stream_ids, now_ms, lease_ms), "renew leases"
        )
        return result

    async def _renew(
        self, worker_id: str, stream_ids: Sequence[str], now_ms: int, lease_ms: int
    ) -> list[str]:
        held = []
        for stream_id in dict.fromkeys(stream_ids):
            revision, row = await self._current(stream_id)
            while row is not None and row.lease_owner == worker_id:
                renewed = replace(row, lease_expires_ms=now_ms + lease_ms)
                if row == renewed or await self._put_row(stream_id, renewed, revision):
                    held.append(stream_id)
                    break
                revision, row = await self._current_after_miss(stream_id)
        return held

    async def release(self, worker_id: str, stream_id: str, due_ms: int | None = None) -> None:
        await self.connection.guard(self._release(worker_id, stream_id, due_ms), "release a lease")

    async def _release(self, worker_id: str, stream_id: str, due_ms: int | None) -> None:
        revision, row = await self._current(stream_id)
        while row is not None and row.lease_owner == worker_id:
            free = replace(
                row,
                lease_owner=None,
                lease_expires_ms=0,
                due_ms=row.due_ms if due_ms is None else due_ms,
            )
            if await self._put_row(stream_id, free, revision) is not None:
                return
            revision, row = await self._current_after_miss(stream_id)

    async def next_due_ms(self, step_ids: Sequence[str]) -> int | None:
        wanted = set(step_ids)
        if not wanted:
            return None
        await self.connection.guard(self._sync_queue(), "read the work queue")
        dues = [
            wake_ms(row.due_ms, row.lease_owner, row.lease_expires_ms)
            for _, row in self._rows.values()
            if row is not None and row.step_id in wanted
        ]
        return min(dues, default=None)

    async def apply(self, commit: Commit) -> None:
        update = commit.queue
        assert update is not None
        stream_id = commit.stream_id
        if update.kind == "done":
            await self._put_row(stream_id, None, None)
            return
        if update.kind == "enqueue":
            await self._put_row(
                stream_id, QueueRow(update.step_id, update.priority, update.due_ms), None
            )
            return
        revision, _ = await self._current(stream_id)  # suspend: read, look at the inbox, CAS
        while True:
            pending = await self._inbox_pending(stream_id)
            row = QueueRow(update.step_id, update.priority, queued_due_ms(update, pending))
            if await self._put_row(stream_id, row, revision) is not None:
                return
            revision, _ = await self._current_after_miss(stream_id)

    async def wake(self, stream_id: str, now_ms: int) -> None:
        """Make the execution's row due by ``now_ms`` (an item was posted to its inbox).

        The row is written even when its due time stays: a suspend racing the post then
        fails its compare-and-set and looks at the inbox again."""
        fetched = await self._fetch_row(stream_id)
        revision, row = fetched if fetched is not None else (0, None)
        while row is not None:
            woken = replace(row, due_ms=min(row.due_ms, now_ms))
            if await self._put_row(stream_id, woken, revision) is not None:
                break
            revision, row = await self._current_after_miss(stream_id)

    async def _inbox_pending(self, stream_id: str) -> bool:
        found = await self.js.get(
            self.layout.inbox, {"last_by_subj": self.layout.inbox_subject(stream_id)}
        )
        return found is not None
