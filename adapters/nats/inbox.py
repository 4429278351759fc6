"""The NATS backend's inboxes: stream ``NAME_inbox``, subjects ``NAME.in.<execution>``; an
item's id is its message's stream sequence.

A post stores the item, then makes the execution's queue row due
(:meth:`~stepsource.adapters.nats.queue.NatsQueue.wake`); a commit deletes the items it
consumed once it is stored (see :mod:`stepsource.adapters.nats` for why that is safe).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from stepsource.adapters._rules import check_post
from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.queue import NatsQueue
from stepsource.adapters.nats.wire import BATCH, JsError, decode_inbox_item, encode_inbox_item
from stepsource.adapters.ports import InboxItem
from stepsource.errors import CorruptLogError, LimitExceededError, UsageError

__all__ = ["NatsInbox"]


class NatsInbox:
    """Posts to, reads of and deletions from the executions' inboxes."""

    def __init__(self, js: JetStream, queue: NatsQueue) -> None:
        self.js = js
        self.connection = js.connection
        self.layout = js.layout
        self.queue = queue

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.connection.max_commit_bytes)
        payload = encode_inbox_item(kind, name, bytes(data), now_ms)
        result: int = await self.connection.guard(
            self.post_payload(stream_id, payload, now_ms), "post to an inbox"
        )
        return result

    async def post_payload(self, stream_id: str, payload: bytes, now_ms: int) -> int:
        """Store an encoded item and wake the execution's queue row; the item's id."""
        try:
            item_id = await self.js.publish(
                self.layout.inbox_subject(stream_id), payload, {"Nats-Msg-Id": uuid.uuid4().hex}
            )
        except LimitExceededError as exc:
            raise LimitExceededError(exc.reason, execution_id=stream_id, hint=exc.hint) from None
        await self.queue.wake(stream_id, now_ms)
        return item_id

    async def reserve_ids(self, above: int) -> None:
        """Ids after ``above``: an item's id is its stream sequence, so the empty inbox stream
        is compacted up to ``above + 1`` (JetStream then gives the next message that
        sequence); a stream already past it is left alone."""
        await self.connection.guard(self._reserve(above), "reserve inbox ids")

    async def _reserve(self, above: int) -> None:
        info = await self.js.api(f"$JS.API.STREAM.INFO.{self.layout.inbox}", {})
        state = info.get("state", {})
        if int(state.get("last_seq", 0)) >= above:
            return
        if int(state.get("messages", 0)) > 0:  # compacting would delete them
            raise UsageError(
                "the inbox stream holds items: inbox ids can be reserved only on an empty one",
                hint="Export into a new stream (?stream=NAME)",
            )
        await self.js.api(f"$JS.API.STREAM.PURGE.{self.layout.inbox}", {"seq": above + 1})

    async def read(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0:
            return []
        result: list[InboxItem] = await self.connection.guard(
            self._read_inbox(stream_id, after_id, limit), "read an inbox"
        )
        return result

    async def _read_inbox(self, stream_id: str, after_id: int, limit: int) -> list[InboxItem]:
        subject = self.layout.inbox_subject(stream_id)
        seq = max(after_id + 1, 1)
        items: list[InboxItem] = []
        while len(items) < limit:
            batch, more = await self.js.batch(
                self.layout.inbox,
                {"seq": seq, "next_by_subj": subject, "batch": min(limit - len(items), BATCH)},
            )
            for stored in batch:
                try:
                    kind, name, data, posted = decode_inbox_item(stored.data)
                except ValueError as exc:
                    raise CorruptLogError(
                        f"inbox message {stored.seq} in {self.layout.inbox} is not a stepsource "
                        f"inbox item ({exc})",
                        execution_id=stream_id,
                    ) from None
                items.append(InboxItem(stored.seq, stream_id, kind, name, data, posted))
            if not batch or not more:
                break
            seq = batch[-1].seq + 1
        return items[:limit]

    async def delete_items(self, stream_id: str, item_ids: Sequence[int]) -> None:
        """Delete these items of the execution (those gone already, or another's, stay)."""
        subject = self.layout.inbox_subject(stream_id)
        for item_id in dict.fromkeys(item_ids):
            if item_id <= 0:
                continue
            stored = await self.js.get(self.layout.inbox, {"seq": item_id})
            if stored is None or stored.subject != subject:
                continue  # gone already, or another execution's item
            try:
                await self.js.api(
                    f"$JS.API.STREAM.MSG.DELETE.{self.layout.inbox}",
                    {"seq": item_id, "no_erase": True},
                )
            except JsError as exc:
                if exc.code != 404 and exc.err_code not in (10037, 10057):
                    raise
