"""The Redis backend's event log: one server-side script per commit, commits pipelined.

**A commit** is one run of the ``commit`` script (:data:`.scripts.COMMIT`):
it compares the stream's length (``LLEN P:ev:{S}``) with the expected version and the queue
row's lease owner with the commit's, and only then hands out positions (``INCRBY P:pos``),
appends each event to the global log (``XADD P:log <position>-0``) and its position to the
stream's list, deletes the consumed inbox items, posts the outbox and applies the queue
update. The server runs nothing else meanwhile, so the checks and the writes are one atomic
step, and positions become visible in order (a reader of the log never skips one that shows
up later).

**Group commit.** Concurrent :meth:`RedisLog.append` calls of one event loop share one
pipeline, with no background task: each caller adds its commit to a pending list; whoever
finds no flush under way takes *all* pending commits and sends them as one pipeline of
script calls (one round trip; with ``appendfsync always`` the server writes and fsyncs the
whole batch before answering any of it). The scripts are independent, so one caller's
conflict never fails another's. The flush is shielded from cancellation, so a cancelled
leader never strands the commits of the callers waiting on it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import orjson

from stepsource.adapters._rules import check_commit, lease_conflict, version_conflict
from stepsource.adapters.ports import Commit, RecordedEvent
from stepsource.adapters.redis.connection import Arg, RedisConnection, to_bytes, to_text
from stepsource.adapters.redis.scripts import COMMIT, READ_STREAM, Script
from stepsource.errors import CorruptLogError, StepsourceError, UsageError

__all__ = ["RedisLog", "batch_calls", "commit_blobs", "commit_head", "encode_head"]

_MAX_INDEX = 2**62  # list indexes and stream ids beyond this hold nothing
_CALL_COMMITS = 1000  # commits per script call at most
_GATHER_TURNS = 3  # loop turns a flush waits at most for callers about to append
_CALL_BYTES = 8 * 1024 * 1024  # bytes of blobs per script call (beyond one commit's own)


def commit_head(commit: Commit) -> list[object]:
    """The commit's head for the commit script (see :data:`.scripts.COMMIT`): everything
    but its blobs, which travel as arguments of their own."""
    owner = commit.lease_owner
    update = commit.queue
    queue: list[object] = []
    if update is not None:
        queue = [
            update.kind,
            update.step_id,
            str(update.priority),
            str(update.due_ms),
            str(update.now_ms),
            update.owner,
            str(update.lease_expires_ms),
        ]
    return [
        commit.stream_id,
        commit.expected_version,
        [] if owner is None else [owner],
        [event.topic for event in commit.events],
        [str(item) for item in dict.fromkeys(commit.consumed) if item > 0],  # ids start at 1
        [[out.stream_id, out.kind, out.name, str(out.now_ms)] for out in commit.outbox],
        queue,
    ]


def commit_blobs(commit: Commit) -> list[bytes]:
    """The commit's blobs, in the order the commit script reads them."""
    blobs = [bytes(event.data) for event in commit.events]
    blobs += [bytes(out.data) for out in commit.outbox]
    return blobs


def encode_head(commit: Commit) -> bytes:
    """The commit's head as JSON; a UsageError naming the execution if it has text JSON
    cannot carry (a lone surrogate), so a bad commit fails its caller only."""
    try:
        return orjson.dumps(commit_head(commit))
    except orjson.JSONEncodeError as exc:
        raise UsageError(
            f"the commit cannot be sent to Redis ({exc})",
            execution_id=commit.stream_id,
            hint="Identifiers, topics and names must be valid Unicode text",
        ) from None


def batch_calls(
    batch: Sequence[tuple[bytes, list[bytes]]],
) -> list[tuple[Script, list[Arg], int]]:
    """The script calls that carry a batch of commits (each its encoded head and its
    blobs), in order, each with the number of commits it carries: one call for up to
    :data:`_CALL_COMMITS` commits or :data:`_CALL_BYTES` bytes of blobs (a larger commit
    alone)."""
    calls: list[tuple[Script, list[Arg], int]] = []
    heads: list[bytes] = []
    blobs: list[Arg] = []
    size = 0

    def close() -> None:
        calls.append((COMMIT, [b"[" + b",".join(heads) + b"]", *blobs], len(heads)))

    for head, more in batch:
        grow = sum(len(blob) for blob in more)
        if heads and (len(heads) >= _CALL_COMMITS or size + grow > _CALL_BYTES):
            close()
            heads, blobs, size = [], [], 0
        heads.append(head)
        blobs += more
        size += grow
    if heads:
        close()
    return calls


def _unexpected(answer: object, stream_id: str | None = None) -> CorruptLogError:
    return CorruptLogError(f"the server answered a commit with {answer!r}", execution_id=stream_id)


@dataclass(eq=False, slots=True)
class _Pending:
    commit: Commit
    head: bytes
    blobs: list[bytes]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    taken: bool = False
    done: bool = False
    position: int = 0
    error: StepsourceError | None = None


@dataclass(slots=True)
class _LoopState:
    flushing: bool = False
    pending: list[_Pending] = field(default_factory=list)
    last_batch: int = 0  # commits in the last flush

    def hand_over(self) -> None:
        """Wake the first waiting caller to lead the next flush, if none is under way."""
        if not self.flushing and self.pending:
            self.pending[0].wake.set()

    async def gather(self) -> None:
        """When the last flush carried several commits, let the event loop run the tasks
        that are about to append before this flush takes the pending ones: callers woken by
        the last flush come back within a few loop turns, and without the wait the first
        of them would flush alone (one more round trip and fsync per round). A lone
        sequential caller (last flush of one) never waits."""
        turns = 0
        while len(self.pending) < self.last_batch and turns < _GATHER_TURNS:
            await asyncio.sleep(0)
            turns += 1


class RedisLog:
    """Appends and reads of event streams and of the global log."""

    def __init__(self, conn: RedisConnection, max_commit_bytes: int) -> None:
        self.conn = conn
        self.keys = conn.keys
        self.max_commit_bytes = max_commit_bytes
        #: round trips made by :meth:`append` (a batch of concurrent commits counts once)
        self.batches_sent = 0
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        return state

    async def append(self, commit: Commit) -> int:
        check_commit(commit, self.max_commit_bytes, leases=True)
        await self.conn.client()  # under trio: the clear refusal, before anything is queued
        state = self._state()
        pending = _Pending(commit, encode_head(commit), commit_blobs(commit))
        state.pending.append(pending)
        while not pending.done:
            if state.flushing:
                try:
                    await pending.wake.wait()
                except BaseException:
                    if not pending.taken:
                        state.pending.remove(pending)
                    state.hand_over()  # it may have been woken to lead
                    raise
                pending.wake.clear()
                continue
            state.flushing = True
            try:
                try:
                    await state.gather()
                except BaseException:
                    state.pending.remove(pending)  # not taken yet: nothing was sent
                    raise
                batch, state.pending = state.pending, []
                for item in batch:
                    item.taken = True
                state.last_batch = len(batch)
                if len(batch) == 1:  # its own commit only: a cancellation strands nobody
                    await self._flush(batch)
                else:
                    with anyio.CancelScope(shield=True):
                        await self._flush(batch)
            finally:
                state.flushing = False
                state.hand_over()
        if pending.error is not None:
            raise pending.error
        return pending.position

    async def _flush(self, batch: list[_Pending]) -> None:
        answers: list[object] = []
        try:
            self.batches_sent += 1
            calls = batch_calls([(item.head, item.blobs) for item in batch])
            replies = await self.conn.run_many(
                [(script, args) for script, args, _ in calls], "append a commit"
            )
            for (_, _, count), reply in zip(calls, replies, strict=True):
                if isinstance(reply, list) and len(reply) == count:
                    answers += reply
                elif isinstance(reply, StepsourceError):  # each of its commits fails with it
                    answers += [reply] * count
                else:
                    answers += [_unexpected(reply)] * count
        except StepsourceError as exc:
            answers = [exc] * len(batch)
        except BaseException as exc:  # interrupted, or a bug: the outcome is unknown
            lost = self.conn.unavailable("append a commit", f"{type(exc).__name__}: {exc}")
            answers = [lost] * len(batch)
            for item, answer in zip(batch, answers, strict=True):
                self._outcome(item, answer)
            raise
        finally:
            for item in batch:  # whatever happened, nobody waits for ever
                item.done = True
                item.wake.set()
        for item, answer in zip(batch, answers, strict=True):
            self._outcome(item, answer)

    def _outcome(self, item: _Pending, answer: object) -> None:
        commit = item.commit
        if isinstance(answer, int):
            item.position = answer
            return
        if isinstance(answer, StepsourceError):
            item.error = type(answer)(
                answer.reason, execution_id=commit.stream_id, hint=answer.hint
            )
            return
        if not isinstance(answer, list) or len(answer) < 2:
            item.error = _unexpected(answer, commit.stream_id)
            return
        status = to_text(answer[0])
        if status == "version":
            item.error = version_conflict(commit, int(answer[1]))
        elif status == "lease" and len(answer) == 3:
            item.error = lease_conflict(commit, to_text(answer[2]) if int(answer[1]) else None)
        elif status == "error":
            failed = self.conn.script_failure("append a commit", to_text(answer[1]))
            item.error = type(failed)(
                failed.reason, execution_id=commit.stream_id, hint=failed.hint
            )
        else:
            item.error = _unexpected(answer, commit.stream_id)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        start = min(max(from_version, 1) - 1, _MAX_INDEX)
        stop = -1
        if to_version is not None:
            if to_version < 1 or to_version - 1 < start:
                return []
            stop = min(to_version - 1, _MAX_INDEX)
        try:
            flat = await self.conn.run(READ_STREAM, [stream_id, start, stop], "read a stream")
        except CorruptLogError as exc:
            raise CorruptLogError(exc.reason, execution_id=stream_id, hint=exc.hint) from None
        try:
            return [
                RecordedEvent(
                    stream_id,
                    start + 1 + n,
                    to_text(flat[i + 1]),
                    to_bytes(flat[i + 2]),
                    int(flat[i]),
                )
                for n, i in enumerate(range(0, len(flat), 3))
            ]
        except (IndexError, TypeError, ValueError) as exc:
            raise CorruptLogError(
                f"an event of the execution is damaged ({type(exc).__name__}: {exc})",
                execution_id=stream_id,
            ) from None

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        after = max(after_position, 0)
        if limit <= 0 or after >= _MAX_INDEX:
            return []
        entries = await self.conn.xrange(self.keys.log, f"{after + 1}-0", limit, "read the log")
        events = []
        for position, fields in entries:
            try:
                events.append(
                    RecordedEvent(
                        to_text(fields[b"s"]),
                        int(fields[b"v"]),
                        to_text(fields[b"t"]),
                        fields[b"d"],
                        position,
                    )
                )
            except (KeyError, ValueError) as exc:
                raise CorruptLogError(
                    f"the log entry at position {position} under prefix {self.keys.prefix!r} "
                    f"is damaged ({type(exc).__name__}: {exc})"
                ) from None
        return events

    async def stream_version(self, stream_id: str) -> int:
        client = await self.conn.client()
        async with self.conn.guard("read a stream's version"):
            return int(await client.llen(self.keys.events(stream_id)))

    async def max_position(self) -> int:
        client = await self.conn.client()
        async with self.conn.guard("read the log's last position"):
            value = await client.get(self.keys.position)
        return 0 if value is None else int(value)
