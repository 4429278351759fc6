"""What one NATS backend object stored lately: the events of its own commits, by stream
sequence, so that a read of the whole log (the read-model runner reads back every event
the engine appends) takes them from memory instead of fetching and decoding them again.

Only acknowledged messages enter it, each exactly as a read of its sequence would return
it; a read still asks the server for every sequence it does not hold (another process's
commits, anything older than the bound) and for whatever follows the last one it holds.
"""

from __future__ import annotations

from stepsource.adapters.nats.wire import POSITION_STRIDE
from stepsource.adapters.ports import Commit, NewEvent, RecordedEvent

__all__ = ["RecentCommits"]


class RecentCommits:
    """The events of the last ``max_commits`` commits this object stored (at most
    ``max_bytes`` of event data in all), by the stream sequence of their message.

    A commit's events are kept as they came (its records are made when a read asks for
    them), so that remembering costs an append next to nothing when no read of the whole
    log follows; a copy of their sequence, so that a caller reusing its list changes
    nothing here."""

    __slots__ = ("_bytes", "_commits", "max_bytes", "max_commits")

    def __init__(self, max_commits: int = 8192, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_commits = max_commits
        self.max_bytes = max_bytes
        self._commits: dict[int, tuple[str, tuple[NewEvent, ...], int]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._commits)

    def add(self, seq: int, commit: Commit) -> None:
        """Remember ``commit``, acknowledged as message ``seq`` of the event stream."""
        events = tuple(commit.events)
        size = 0
        for event in events:
            size += len(event.data)
        commits = self._commits
        if size > self.max_bytes or seq in commits:
            return
        commits[seq] = (commit.stream_id, events, size)
        self._bytes += size
        while len(commits) > self.max_commits or self._bytes > self.max_bytes:
            oldest = next(iter(commits))  # the first remembered (dicts keep insertion order)
            self._bytes -= commits.pop(oldest)[2]

    def get(self, seq: int) -> list[RecordedEvent] | None:
        """The events of message ``seq`` if this object stored it lately, else None: the
        records a read of that message returns."""
        found = self._commits.get(seq)
        if found is None:
            return None
        stream_id, events, _ = found
        position = seq * POSITION_STRIDE
        records = []
        for event in events:
            data = event.data
            records.append(
                RecordedEvent(
                    stream_id,
                    event.version,
                    event.topic,
                    data if type(data) is bytes else bytes(data),
                    position,
                )
            )
            position += 1
        return records

    def clear(self) -> None:
        self._commits.clear()
        self._bytes = 0
