"""The NATS backend's event log: one message per commit, optimistic concurrency on the
subject's last sequence, positions from stream sequences.

A commit's events go out first; its inbox deletions (:class:`~.inbox.NatsInbox`), outbox
posts and queue update (:class:`~.queue.NatsQueue`) follow once they are stored. See
:mod:`stepsource.adapters.nats` for the whole design.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

from stepsource.adapters._rules import check_commit, lease_conflict, version_conflict
from stepsource.adapters.nats.inbox import NatsInbox
from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.queue import NatsQueue, NotHolder
from stepsource.adapters.nats.recent import RecentCommits
from stepsource.adapters.nats.wire import (
    BATCH,
    FIRST_HEADER,
    LAST_HEADER,
    MAX_EVENTS_PER_COMMIT,
    POSITION_STRIDE,
    WRONG_LAST,
    JsError,
    Stored,
    Transient,
    decode_commit,
    decode_token,
    encode_commit,
    encode_inbox_item,
    encode_token,
)
from stepsource.adapters.ports import UNREADABLE_TOPIC, Commit, RecordedEvent
from stepsource.errors import (
    BackendUnavailableError,
    CorruptLogError,
    LimitExceededError,
)

__all__ = ["NatsLog", "Tail"]

_TAILS = 50_000  # executions whose last known message one backend object remembers


_logger = logging.getLogger("stepsource.nats")


@dataclass(frozen=True, slots=True)
class Tail:
    """The last message of an execution's subject that this object knows of."""

    seq: int
    first_version: int
    last_version: int

    @property
    def position(self) -> int:
        return self.seq * POSITION_STRIDE + self.last_version - self.first_version


class NatsLog:
    """Appends and reads of the event log (stream ``NAME``, subjects ``NAME.ev.<id>``).

    It remembers the last message of the executions it appended to or read (a bounded
    cache), so an append usually needs no read first, and the events of its own recent
    commits (:class:`~.recent.RecentCommits`), which a read of the whole log takes from
    memory."""

    def __init__(self, js: JetStream, queue: NatsQueue, inboxes: NatsInbox) -> None:
        self.js = js
        self.connection = js.connection
        self.layout = js.layout
        self.queue = queue
        self.inboxes = inboxes
        self._tails: OrderedDict[str, Tail] = OrderedDict()
        self.recent = RecentCommits()
        self._passed_over: set[int] = set()  # foreign messages already reported

    def forget(self) -> None:
        """Drop what this object remembers of the executions' last messages."""
        self._tails.clear()
        self.recent.clear()

    def _remember(self, stream_id: str, tail: Tail) -> None:
        known = self._tails.get(stream_id)
        if known is None or known.seq < tail.seq:
            self._tails[stream_id] = tail
        self._tails.move_to_end(stream_id)
        while len(self._tails) > _TAILS:
            self._tails.popitem(last=False)

    def _expand_any(self, stored: Stored) -> list[RecordedEvent]:
        """:meth:`_expand` for a read of the whole log, where one foreign message must not
        stop the reading of every other execution: a message on an execution's subject that
        is not a commit becomes one record of :data:`UNREADABLE_TOPIC` (its execution is
        quarantined when decoded); one whose subject names no execution is passed over."""
        try:
            return self._expand(stored)
        except CorruptLogError as error:
            prefix = f"{self.layout.events}.ev."
            token = stored.subject.removeprefix(prefix)
            try:
                stream_id = decode_token(token) if token != stored.subject else ""
            except ValueError:
                stream_id = ""
            if not stream_id or "." in token:
                if stored.seq not in self._passed_over:  # said once per message
                    self._passed_over.add(stored.seq)
                    _logger.warning("passed over: %s", error.reason)
                return []
            try:
                version = max(int(stored.headers.get(FIRST_HEADER, "0")), 0)
            except ValueError:
                version = 0
            reason = error.reason.encode("utf-8", "replace")
            position = stored.seq * POSITION_STRIDE
            return [RecordedEvent(stream_id, version, UNREADABLE_TOPIC, reason, position)]

    def _expand(self, stored: Stored) -> list[RecordedEvent]:
        prefix = f"{self.layout.events}.ev."
        try:
            stream_id = decode_token(stored.subject.removeprefix(prefix))
            first = int(stored.headers[FIRST_HEADER])
            last = int(stored.headers[LAST_HEADER])
            events = decode_commit(stored.data)
            if len(events) != last - first + 1:
                raise ValueError(f"{len(events)} events for versions {first}..{last}")
        except (KeyError, ValueError) as exc:
            raise CorruptLogError(
                f"message {stored.seq} of the JetStream stream {self.layout.events} is not a "
                f"stepsource commit ({exc})",
                hint="Something else published into this stream's subjects: remove it, or "
                "use another ?stream= name",
            ) from None
        base = stored.seq * POSITION_STRIDE
        return [
            RecordedEvent(stream_id, first + index, topic, data, base + index)
            for index, (topic, data) in enumerate(events)
        ]

    async def _last_commit(self, stream_id: str) -> Tail | None:
        """The last message of the execution's subject, read from the stream's leader."""
        stored = await self.js.get(
            self.layout.events, {"last_by_subj": self.layout.event_subject(stream_id)}
        )
        if stored is None:
            return None
        events = self._expand(stored)
        tail = Tail(stored.seq, events[0].version, events[-1].version)
        self._remember(stream_id, tail)
        return tail

    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.connection.max_commit_bytes)
        if len(commit.events) > MAX_EVENTS_PER_COMMIT:
            raise LimitExceededError(
                f"the commit holds {len(commit.events)} events, more than the NATS backend's "
                f"limit of {MAX_EVENTS_PER_COMMIT}",
                execution_id=commit.stream_id,
                hint="Commit the events in smaller groups",
            )
        result: int = await self.connection.guard(self._append(commit), "append to the event log")
        return result

    async def _append(self, commit: Commit) -> int:
        stream_id = commit.stream_id
        known = self._tails.get(stream_id)
        tail: Tail | None
        if commit.expected_version == 0 and commit.events:
            tail = None  # "no message on the subject" is the check itself
        elif known is not None and known.last_version == commit.expected_version and commit.events:
            tail = known
        else:
            tail = await self._last_commit(stream_id)
            current = tail.last_version if tail is not None else 0
            if current != commit.expected_version:
                raise version_conflict(commit, current)
        if commit.lease_owner is not None and not commit.events:  # else checked as published
            holder = await self.queue.lease_holder(stream_id)
            if holder != commit.lease_owner:
                raise lease_conflict(commit, holder)
        if commit.events:
            seq = await self._publish_commit(commit, tail.seq if tail is not None else 0)
            tail = Tail(seq, commit.events[0].version, commit.events[-1].version)
            self._remember(stream_id, tail)
            self.recent.add(seq, commit)
        try:
            if commit.consumed:
                await self.inboxes.delete_items(stream_id, commit.consumed)
            for outgoing in commit.outbox:  # after the events: see the module docstring
                payload = encode_inbox_item(
                    outgoing.kind, outgoing.name, bytes(outgoing.data), outgoing.now_ms
                )
                await self.inboxes.post_payload(outgoing.stream_id, payload, outgoing.now_ms)
            if commit.queue is not None:
                await self.queue.apply(commit)
        except (Transient, JsError) as exc:
            raise BackendUnavailableError(
                f"the commit is stored, but updating the inboxes or work queue after it failed "
                f"({exc})",
                execution_id=stream_id,
                hint="The execution resumes by replay once its lease expires",
            ) from None
        return tail.position if tail is not None else 0

    async def _publish_commit(self, commit: Commit, expected_seq: int) -> int:
        first, last = commit.events[0].version, commit.events[-1].version
        token = encode_token(commit.stream_id)
        subject = f"{self.layout.events}.ev.{token}"
        msg_id = f"{token}:{first}:{os.urandom(16).hex()}"
        headers = {
            "Nats-Msg-Id": msg_id,
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            FIRST_HEADER: str(first),
            LAST_HEADER: str(last),
        }
        payload = encode_commit([(event.topic, event.data) for event in commit.events])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connection.operation_timeout
        delay, unsure = 0.02, False
        owner = commit.lease_owner
        checked = owner is None  # whether the lease check passed (nothing is sent before)
        while True:
            try:
                if owner is not None and not checked:
                    try:  # the check and the first send, by the catch-up of the queue mirror
                        seq = await self.queue.publish_leased(
                            commit.stream_id, owner, (subject, payload, headers)
                        )
                    except NotHolder as refused:
                        raise lease_conflict(commit, refused.holder) from None
                    except BaseException:
                        checked = True  # what failed came after the check: the publish
                        raise
                    if seq is not None:
                        return seq
                    holder = await self.queue.row_holder(commit.stream_id)  # not confirmed: read
                    if holder != owner:
                        raise lease_conflict(commit, holder)
                    checked = True
                return await self.js.publish(subject, payload, headers, retry=False)
            except JsError as exc:
                if exc.err_code not in WRONG_LAST:
                    raise
                if unsure:  # was it our own earlier attempt whose ack was lost?
                    found = await self.js.get(
                        self.layout.events, {"seq": expected_seq + 1, "next_by_subj": subject}
                    )
                    if found is not None and found.headers.get("Nats-Msg-Id") == msg_id:
                        return found.seq
                latest = await self._last_commit(commit.stream_id)
                raise version_conflict(
                    commit, latest.last_version if latest is not None else 0
                ) from None
            except LimitExceededError as exc:
                raise LimitExceededError(
                    exc.reason, execution_id=commit.stream_id, hint=exc.hint
                ) from None
            except (Transient, BackendUnavailableError) as exc:
                # a BackendUnavailableError is a connect failing (nats-py gave up
                # reconnecting): before anything was sent, nothing can be stored
                if isinstance(exc, BackendUnavailableError) and not unsure:
                    raise
                unsure = True
                if loop.time() + delay > deadline:
                    cause = exc.reason if isinstance(exc, BackendUnavailableError) else exc
                    raise BackendUnavailableError(
                        f"NATS at {self.connection.where()} did not acknowledge the commit "
                        f"({cause}); it may or may not be stored",
                        execution_id=commit.stream_id,
                        hint="Read the stream's version before appending again",
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        start = max(from_version, 1)
        if to_version is not None and to_version < start:
            return []
        result: list[RecordedEvent] = await self.connection.guard(
            self._read_stream(stream_id, start, to_version), "read an execution's events"
        )
        return result

    async def _read_stream(
        self, stream_id: str, start: int, stop: int | None
    ) -> list[RecordedEvent]:
        subject = self.layout.event_subject(stream_id)
        known = self._tails.get(stream_id)
        seq = known.seq if known is not None and known.first_version <= start else 1
        upto: int | None = None  # on replicas, read until the leader's last message
        if self.js.replicas > 1:
            last = await self._last_commit(stream_id)
            if last is None:
                return []
            upto = last.seq
        found: list[RecordedEvent] = []
        while True:
            batch, more = await self.js.batch(
                self.layout.events, {"seq": seq, "next_by_subj": subject, "batch": BATCH}
            )
            if upto is not None and not more and (not batch or batch[-1].seq < upto):
                batch = await self._leader_catch_up(subject, batch, seq, upto)
            for stored in batch:
                found.extend(
                    event
                    for event in self._expand(stored)
                    if event.version >= start and (stop is None or event.version <= stop)
                )
            if not batch:
                break
            tail_events = self._expand(batch[-1])
            if not more:
                self._remember(
                    stream_id,
                    Tail(batch[-1].seq, tail_events[0].version, tail_events[-1].version),
                )
                break
            if stop is not None and tail_events[-1].version >= stop:
                break
            seq = batch[-1].seq + 1
        if any(event.version != start + n for n, event in enumerate(found)):
            raise CorruptLogError(
                f"the execution's versions from {start} have a gap in the JetStream stream "
                f"{self.layout.events}",
                execution_id=stream_id,
                hint="Messages were removed outside stepsource: restore the stream",
            )
        return found

    async def _leader_catch_up(
        self, subject: str, batch: list[Stored], seq: int, upto: int
    ) -> list[Stored]:
        """A replica answered behind the leader: read the rest from the leader itself."""
        batch = list(batch)
        after = batch[-1].seq + 1 if batch else seq
        while after <= upto:
            stored = await self.js.get(self.layout.events, {"seq": after, "next_by_subj": subject})
            if stored is None or stored.seq > upto:
                break
            batch.append(stored)
            after = stored.seq + 1
        return batch

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        if limit <= 0:
            return []
        result: list[RecordedEvent] = await self.connection.guard(
            self._read_all(max(after_position, 0), limit), "read the event log"
        )
        return result

    async def _read_all(self, after: int, limit: int) -> list[RecordedEvent]:
        seq = max(after // POSITION_STRIDE, 1)
        found: list[RecordedEvent] = []
        recent = self.recent
        while len(found) < limit:
            known = recent.get(seq)
            if known is not None:  # stored by this object: no need to fetch it back
                found.extend(e for e in known if e.position > after)
                seq += 1
                continue
            batch, more = await self.js.batch(
                self.layout.events, {"seq": seq, "batch": min(limit - len(found) + 1, BATCH)}
            )
            for stored in batch:
                found.extend(e for e in self._expand_any(stored) if e.position > after)
            if not batch or not more:
                break
            seq = batch[-1].seq + 1
        return found[:limit]

    async def stream_version(self, stream_id: str) -> int:
        tail = await self.connection.guard(
            self._last_commit(stream_id), "read an execution's version"
        )
        return 0 if tail is None else int(tail.last_version)

    async def max_position(self) -> int:
        result: int = await self.connection.guard(self._max_position(), "read the event log's end")
        return result

    async def _max_position(self) -> int:
        info = await self.js.api(f"$JS.API.STREAM.INFO.{self.layout.events}", {})
        last = int(info["state"].get("last_seq", 0))
        if last == 0:
            return 0
        stored = await self.js.get(self.layout.events, {"seq": last})
        if stored is None:
            return 0
        events = self._expand_any(stored)
        return events[-1].position if events else last * POSITION_STRIDE
