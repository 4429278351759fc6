"""The distributed backend: NATS JetStream, for workers on many machines.

:class:`NatsBackend` is composed of parts, each an object around one connection
(:mod:`.connection`, the only owner of the nats-py ``Client``; the driver comes with the
``nats`` extra) and the JetStream API above it (:mod:`.jetstream`), as nats-py composes
``JetStreamContext`` and ``KeyValue`` around one ``Client``:

- :mod:`.log`: the event log; :mod:`.queue`: the work queue, its mirror and lease checks;
  :mod:`.inbox`: the inboxes; :mod:`.meta`: definitions and snapshots; :mod:`.kv`: the
  global key-value store;
- :mod:`.replies`: the one reply subscription of a connection, and a faster header parser;
- :mod:`.wire`: bytes on the wire, names of streams and subjects, and the URL (no driver
  needed: importing this package, or :mod:`.wire`, does not import nats-py; only
  :class:`NatsBackend` does).

nats-py runs on asyncio only: under any other event loop every call raises
:class:`~stepsource.errors.UsageError`.

**Layout.** For the tenant ``stream=NAME`` (default ``STEPSOURCE``):

- stream ``NAME``, subjects ``NAME.ev.<execution>``: the event log, one message per commit
  (all its events, headers naming the first and last version); no deletes, no purges;
- stream ``NAME_inbox``, subjects ``NAME.in.<execution>``: inbox items, the message sequence
  is the item id;
- KV bucket ``NAME_queue``: one key per queued execution (step, priority, due, lease);
- KV bucket ``NAME_meta``: published definitions (``def.<step>``) and snapshots
  (``snap.<execution>``);
- KV bucket ``NAME_kv``: global-scope state, each key's expiry in a header.

**Appends** are guarded by ``Nats-Expected-Last-Subject-Sequence``: the sequence of the
message that holds ``expected_version`` comes from a per-execution cache of this object's
own appends and reads, else from the subject's last message. Codes 10071/10164 are a
version conflict; 10163 and lost connections are retried with backoff. Each publish carries
a unique ``Nats-Msg-Id``; when an acknowledgement was lost and the retry is refused, the
message after the expected one is read back: if it carries that id, the commit was stored.
Concurrent appends are pipelined: each caller publishes at once and awaits only its own
ack, so commits of many actors share the connection's write buffer and round trips. Every
request and batched direct get of a connection gets its answer through one subscription
(:class:`~stepsource.adapters.nats.replies.Replies`).

**Positions** are ``stream sequence * 1024 + index of the event in its message``: a commit
holds at most 1024 events; positions grow in commit order, with gaps between commits.

**Work queue.** Rows are changed by compare-and-set on the key's revision, so a lease is
atomic across processes. Each object mirrors the queue bucket in memory and catches up
(one batched direct get of what changed) before it leases, answers ``next_due_ms`` or
checks a commit's lease; its own writes enter the mirror at once.

**Not atomic with a commit** (JetStream has no multi-subject transaction), each safe:

- the lease check of ``Commit.lease_owner`` is made just before publishing, on the queue
  mirror caught up by a probe sent after the commit began (shared by concurrent commits,
  whose messages the probing task then sends; a row read if the probe fails): a zombie
  that passes it still fails the append, because the new holder's first append
  (StepLeased) moved the subject's last sequence;
- consumed inbox items are deleted after the commit is stored: a crash in between leaves
  items the engine already moved into the stream, and it skips those by id;
- a commit's outbox (inbox items for other executions, such as a child's nudge to its
  parent) is posted right after the commit is stored: a crash in between leaves the parent
  to the engine's periodic recheck of what it waits for;
- the queue update is written after the commit is stored (the events are the truth; a lost
  update leaves the row leased until its lease expires, then the execution is leased again
  and resumes by replay). ``suspend`` and :meth:`NatsBackend.post` both write the row by
  compare-and-set, the post *after* storing its item and even when nothing changes, so a
  post racing a suspend is always seen by one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepsource.adapters.nats.backend import NatsBackend

__all__ = ["NatsBackend"]


def __getattr__(name: str) -> Any:
    # the backend (and with it nats-py) is imported on first use, so that the URL and the
    # stored bytes (:mod:`.wire`) can be read without the driver installed
    if name == "NatsBackend":
        from stepsource.adapters.nats.backend import NatsBackend

        return NatsBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
