"""The names of the keys the Redis backend creates, all under one prefix ``P``.

Per execution ``S`` (its keys share one hash slot: the ``{S}`` hash tag)::

    P:ev:{S}     list    the global positions of the execution's events, version 1 first
    P:q:{S}      hash    its work-queue row: step, prio, due, and owner/exp while leased
    P:in:{S}     stream  its inbox: entry id ``<item id>-0``, fields k (kind), n, d, t
    P:snap:{S}   hash    its latest snapshot: v (version), t (topic), d (data)

Global::

    P:pos        string  the last position handed out
    P:log        stream  every event: entry id ``<position>-0``, fields s, v, t (topic), d
    P:due:<step> zset    the queued executions of a step, scored by when they may be leased
    P:inid       string  the last inbox item id handed out
    P:def:<step> hash    the step's published definition: v (version), d (data)
    P:kv:<key>   hash    a global key-value entry: d (data), r (revision), x (expiry)
    P:kvrev      string  the last key-value revision handed out
    P:wake       channel published to after every commit and post that makes work runnable

The kind comes before the identifier, so no identifier can make two names equal. The Lua
scripts (:mod:`~stepsource.adapters.redis.scripts`) build the same names from the prefix.
"""

from __future__ import annotations

__all__ = ["Keys"]


class Keys:
    """Key names for one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def events(self, stream_id: str) -> str:
        return f"{self.prefix}:ev:{{{stream_id}}}"

    def row(self, stream_id: str) -> str:
        return f"{self.prefix}:q:{{{stream_id}}}"

    def inbox(self, stream_id: str) -> str:
        return f"{self.prefix}:in:{{{stream_id}}}"

    def snapshot(self, stream_id: str) -> str:
        return f"{self.prefix}:snap:{{{stream_id}}}"

    def due(self, step_id: str) -> str:
        return f"{self.prefix}:due:{step_id}"

    def definition(self, step_id: str) -> str:
        return f"{self.prefix}:def:{step_id}"

    def kv(self, key: str) -> str:
        return f"{self.prefix}:kv:{key}"

    @property
    def position(self) -> str:
        return f"{self.prefix}:pos"

    @property
    def log(self) -> str:
        return f"{self.prefix}:log"

    @property
    def wake(self) -> str:
        return f"{self.prefix}:wake"
