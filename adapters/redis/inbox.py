"""The Redis backend's inbox: one Redis stream per execution (``P:in:{S}``).

An item's id comes from one counter (``INCR P:inid``) and is its entry id (``<id>-0``), so
ids grow in posting order across all executions and a page after an id is one ``XRANGE``.
A post is one script run that also makes a sleeping execution's queue row due at once; a
commit deletes the items it consumed (``XDEL``) in its own script run.
"""

from __future__ import annotations

from stepsource.adapters._rules import check_post
from stepsource.adapters.ports import InboxItem
from stepsource.adapters.redis.connection import RedisConnection, to_text
from stepsource.adapters.redis.scripts import POST, RESERVE_INBOX_IDS
from stepsource.errors import CorruptLogError

__all__ = ["RedisInbox"]

_MAX_ID = 2**63 - 1


class RedisInbox:
    """Post items to an execution's inbox and read them back in id order."""

    def __init__(self, conn: RedisConnection, max_commit_bytes: int) -> None:
        self.conn = conn
        self.keys = conn.keys
        self.max_commit_bytes = max_commit_bytes

    async def post(self, stream_id: str, kind: str, name: str, data: bytes, now_ms: int) -> int:
        check_post(stream_id, data, now_ms, self.max_commit_bytes)
        item = await self.conn.run(
            POST, [stream_id, kind, name, bytes(data), now_ms], "post to an inbox"
        )
        return int(item)

    async def reserve_ids(self, above: int) -> None:
        """Ids after ``above``: the item counter (``P:inid``) raised to it, never lowered."""
        await self.conn.run(RESERVE_INBOX_IDS, [above], "reserve inbox ids")

    async def inbox(self, stream_id: str, after_id: int = 0, limit: int = 1000) -> list[InboxItem]:
        if limit <= 0 or after_id >= _MAX_ID:
            return []
        start = "-" if after_id < 0 else f"{after_id + 1}-0"
        entries = await self.conn.xrange(self.keys.inbox(stream_id), start, limit, "read an inbox")
        items = []
        for item_id, fields in entries:
            try:
                items.append(
                    InboxItem(
                        item_id,
                        stream_id,
                        to_text(fields[b"k"]),
                        to_text(fields[b"n"]),
                        fields[b"d"],
                        int(fields[b"t"]),
                    )
                )
            except (KeyError, ValueError) as exc:
                raise CorruptLogError(
                    f"an inbox item is damaged ({type(exc).__name__}: {exc})",
                    execution_id=stream_id,
                ) from None
        return items
