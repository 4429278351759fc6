"""Reading and checking a rebuild's pages in helper processes, so a rebuild uses every core.

Most of a rebuild's work is per event: reading each record and, for most of them, verifying
its checksum and reading its time (:func:`~.index_reading.index_batch`). That is Python
holding the GIL, so one process does it on one core (about 250,000 events/s). A catch-up of
a large backlog (:data:`HELPERS_FROM` events or more: a rebuild, or the first catch-up of an
index kept in memory, as on Redis, or of a deleted index file) on a backend another process
can open (a SQLite file, a server: not ``memory://`` nor a backend object handed to the
engine) and whose positions count events (``Backend.dense_positions``: not NATS) starts
helpers instead: each is a Python process running :func:`main`, opens the same
backend, and answers ranges of positions with their page as the index folds it. The
rebuilding process sends each helper ranges in turn, two ahead, and folds the answers in log
order, so the index is the one the rebuild would fold alone (``tests/test_rebuild_helpers``).

Between the processes: the helper's first stdin line is a JSON header (the backend URL, the
cipher key, if any: never on the command line), then one line ``after until`` per range;
it answers each with a frame (4 bytes of little-endian length, then JSON) holding the page's
end, record count, first stream and items, or ``{"error": reason}``; it ends at the end of
its stdin. An item is ``["t", position, stream, version, time, count]`` (a run of events the
index only counts), ``["e", position, stream, version, topic, JSON]`` (an event the index
reads: its stored JSON, decrypted, decoded here as the rebuild alone would) or ``["u",
position, stream, version, reason]`` (an event that cannot be read).

A helper that cannot start, fails or ends early costs only speed: :class:`HelperFailed`
says why, and the catch-up folds the rest of the log itself.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import anyio.to_thread
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

from stepsource.adapters.ports import Backend, RecordedEvent
from stepsource.adapters.urls import open_backend
from stepsource.engine.codec import EventCodec, make_cipher
from stepsource.engine.collector import WORKER_THRESHOLD, tuned_collector
from stepsource.engine.index_reading import PLAIN, IndexBatch, Page, opened, page_of
from stepsource.errors import StepsourceError
from stepsource.projections.summaries import Touched, Unreadable

__all__ = [
    "ANSWER_TIMEOUT",
    "HELPERS_FROM",
    "HelperFailed",
    "HelperPool",
    "HelperSpec",
    "default_processes",
    "helper_spec",
]

_logger = logging.getLogger("stepsource.readmodels")

#: a catch-up of fewer events folds them itself: a helper takes about 0.35 s to start
HELPERS_FROM = 200_000
#: more helpers than this gain nothing: the rebuilding process folds every page itself
MAX_HELPERS = 4
#: ranges a helper is sent ahead of the one the rebuild waits for
_AHEAD = 2
_LENGTH = struct.Struct("<I")
#: a helper's program (``-c``: ``-m`` would run this module a second time, as ``__main__``,
#: after the package imported it)
_START = "from stepsource.engine.rebuild_helpers import main; main()"
#: how long a helper has to end once its stdin ends, before it is killed
_END_GRACE = 2.0
#: how long a page may take: a helper silent for longer (stopped, or stuck reaching its
#: backend) counts as failed (a page of 5,000 events takes milliseconds; the first waits for
#: the helper to start)
ANSWER_TIMEOUT = 30.0


def default_processes() -> int:
    """Helpers for a rebuild on this machine: one per core this process may run on (at most
    :data:`MAX_HELPERS`), none with a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity (macOS)
        cores = os.cpu_count() or 1
    return 0 if cores < 2 else min(cores, MAX_HELPERS)


@dataclass(frozen=True)
class HelperSpec:
    """What a helper needs to read the log: its backend URL (None: the default SQLite file,
    as :func:`~stepsource.adapters.urls.open_backend` opens it), the cipher key (None: a
    plaintext log) and how many helpers a rebuild starts."""

    url: str | None
    cipher_key: str | None
    processes: int

    def __repr__(self) -> str:  # the key never shows
        return f"HelperSpec(url={self.url!r}, processes={self.processes})"


def helper_spec(
    url: str | None, key: str | None, backend: object | None, processes: int | None
) -> HelperSpec | None:
    """How an engine's large catch-up reads the log in helper processes (``processes``: how
    many, None for :func:`default_processes`): they open the backend by its URL, so none for
    a backend object handed over (``backend``) or an in-memory log."""
    count = default_processes() if processes is None else processes
    if backend is not None or count == 0:
        return None
    if url is not None and url.partition("://")[0].lower() == "memory":
        return None
    return HelperSpec(url, key, count)


class HelperFailed(Exception):
    """A helper could not start, failed or ended early: the catch-up goes on without them."""


class HelperPool:
    """Running helpers and the ranges sent to them (``async with``: they end with it).

    :meth:`next_page` answers the pages of ``(after, target]`` one after another, in log
    order, each from the helper it was sent to; a range without events is skipped."""

    def __init__(self, spec: HelperSpec, codec: EventCodec, after: int, target: int, size: int):
        self._spec = spec
        self._codec = codec
        self._ranges = [(a, min(a + size, target)) for a in range(after, target, size)]
        self._sent = 0  # ranges sent so far
        self._answered = 0  # ranges answered so far
        self._pages: list[tuple[int, int]] = []  # (end, count) of each page given
        self._processes: list[anyio.abc.Process] = []
        #: helpers started (they may have failed since)
        self.started = 0
        self._outputs: list[BufferedByteReceiveStream] = []

    async def __aenter__(self) -> Self:
        header = orjson.dumps({"url": self._spec.url, "key": self._spec.cipher_key}) + b"\n"
        try:
            for _ in range(self._spec.processes):
                process = await anyio.open_process([sys.executable, "-c", _START])
                self._processes.append(process)
                self.started += 1
                assert process.stdin is not None
                assert process.stdout is not None
                self._outputs.append(BufferedByteReceiveStream(process.stdout))
                await process.stdin.send(header)
            while self._sent < min(len(self._ranges), _AHEAD * len(self._processes)):
                await self._send_next()
        except BaseException as exc:
            await self._end()
            if isinstance(exc, OSError | anyio.BrokenResourceError):
                raise HelperFailed(f"a helper could not start ({exc})") from exc
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._end()

    async def _send_next(self) -> None:
        index = self._sent
        after, until = self._ranges[index]
        stdin = self._processes[index % len(self._processes)].stdin
        assert stdin is not None
        try:
            await stdin.send(b"%d %d\n" % (after, until))
        except (anyio.BrokenResourceError, OSError) as exc:
            raise HelperFailed(f"a helper stopped reading ({exc})") from exc
        self._sent += 1

    async def next_page(self, after: int) -> Page:
        """The next page with events (an empty one past the last range). ``after`` is the
        position folded so far: the pages come in order whatever it says."""
        del after  # the ranges were set at the start
        while self._answered < len(self._ranges):
            which = self._answered % len(self._processes)
            answer = await self._receive(which)
            self._answered += 1
            if self._sent < len(self._ranges):
                await self._send_next()
            if answer["count"]:
                self._pages.append((answer["end"], answer["count"]))
                return Page(
                    answer["end"], answer["count"], answer["first"], self._batch(answer["items"])
                )
        return Page(0, 0, None, [])

    def events_until(self, position: int) -> int:
        """The events of the pages given so far that end at or before ``position`` (the
        index's, after a helper failed: what the catch-up folded from them)."""
        return sum(count for end, count in self._pages if end <= position)

    async def _receive(self, which: int) -> dict[str, Any]:
        output = self._outputs[which]
        try:
            with anyio.fail_after(ANSWER_TIMEOUT):
                (length,) = _LENGTH.unpack(await output.receive_exactly(_LENGTH.size))
                answer = orjson.loads(await output.receive_exactly(length))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
            raise HelperFailed(f"a helper ended early{await self._said(which)}") from exc
        except TimeoutError as exc:
            raise HelperFailed(f"a helper gave no page within {ANSWER_TIMEOUT:g} s") from exc
        if "error" in answer:
            raise HelperFailed(f"a helper failed: {answer['error']}")
        return dict(answer)

    async def _said(self, which: int) -> str:
        """What a helper that ended wrote on stderr (Python's last words), if anything."""
        stderr = self._processes[which].stderr
        if stderr is None:
            return ""
        with anyio.move_on_after(1):
            try:
                text = (await stderr.receive(65536)).decode(errors="replace").strip()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return ""
            return f": {text.splitlines()[-1]}" if text else ""
        return ""

    def _batch(self, items: Sequence[list[Any]]) -> IndexBatch:
        """The page as :func:`~.index_reading.index_batch` gives it in this process."""
        fromisoformat = datetime.fromisoformat
        batch: list[Any] = []
        append = batch.append
        said: set[str] = set()
        records: list[RecordedEvent] = []  # the events the index reads, decoded in one go
        slots: list[int] = []
        for item in items:
            tag, position, stream, version = item[0], item[1], item[2], item[3]
            if tag == "t":
                append((position, Touched(stream, version, fromisoformat(item[4]), item[5])))
            elif tag == "u":
                if stream not in said:  # as index_batch words it: once per execution
                    said.add(stream)
                    _logger.warning("execution %s is quarantined: %s", stream[:80], item[4])
                append((position, Unreadable(stream, version, item[4])))
            else:
                data = item[5].encode() if tag == "e" else base64.b64decode(item[5])
                records.append(RecordedEvent(stream, version, item[4], data, position))
                slots.append(len(batch))
                append(None)
        if records:
            reader = PLAIN if self._codec.encrypted else self._codec
            events = reader.decode_many(records)
            for slot, record, event in zip(slots, records, events, strict=True):
                batch[slot] = (record.position, event)
        return batch

    async def _end(self) -> None:
        """Close each helper's stdin (it ends), wait a little, then kill what still runs."""
        with anyio.CancelScope(shield=True):
            for process in self._processes:
                if process.stdin is not None:
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):  # it ended
                        await process.stdin.aclose()
            with anyio.move_on_after(_END_GRACE):
                for process in self._processes:
                    await process.wait()
            for process in self._processes:
                if process.returncode is None:
                    process.kill()
                await process.aclose()
            self._processes.clear()


# -- the helper process -------------------------------------------------------------------------
def _items(codec: EventCodec, records: list[RecordedEvent], batch: IndexBatch) -> list[Any]:
    """A page's items as the rebuilding process reads them back (:meth:`HelperPool._batch`)."""
    by_position = {record.position: record for record in records}
    items: list[Any] = []
    append = items.append
    for position, item in batch:
        if type(item) is Touched:
            stream, version = item.originator_id, item.originator_version
            append(("t", position, stream, version, item.timestamp, item.events))
        elif type(item) is Unreadable:
            append(("u", position, item.originator_id, item.originator_version, item.reason))
        else:  # an event the index reads: its JSON, decrypted, decoded there again
            record = opened(codec, by_position[position])
            data = bytes(record.data)
            try:
                tag, text = "e", data.decode()
            except UnicodeDecodeError:
                tag, text = "b", base64.b64encode(data).decode()
            append((tag, position, record.stream_id, record.version, record.topic, text))
    return items


async def _range(backend: Backend, codec: EventCodec, after: int, until: int) -> dict[str, Any]:
    """The page of positions ``(after, until]``."""
    records: list[RecordedEvent] = []
    position = after
    while position < until:
        chunk = await backend.read_all(position, until - position)
        if chunk and chunk[-1].position > until:
            chunk = [record for record in chunk if record.position <= until]
        if not chunk:
            break
        records.extend(chunk)
        position = chunk[-1].position
    page = await page_of(backend, codec, records)
    return {
        "end": page.end,
        "count": page.events,
        "first": page.first,
        "items": _items(codec, records, page.batch),
    }


def _write(answer: object) -> None:
    payload = orjson.dumps(answer)
    sys.stdout.buffer.write(_LENGTH.pack(len(payload)) + payload)
    sys.stdout.buffer.flush()


async def _serve() -> None:
    with tuned_collector(WORKER_THRESHOLD):  # a page is thousands of short-lived tuples
        await _answer()


async def _answer() -> None:
    header = orjson.loads(await anyio.to_thread.run_sync(sys.stdin.buffer.readline))
    key = header["key"]
    codec = EventCodec(make_cipher(key) if key else None)
    backend = open_backend(header["url"])
    try:
        while line := await anyio.to_thread.run_sync(sys.stdin.buffer.readline):
            after, until = map(int, line.split())
            try:
                answer = await _range(backend, codec, after, until)
            except StepsourceError as error:  # the rebuilding process reads it again itself
                answer = {"error": str(error)}
            _write(answer)
            if "error" in answer:
                return
    finally:
        await backend.aclose()


def main() -> None:
    # the rebuilding process logs what the pages hold (quarantines), once
    logging.getLogger("stepsource").setLevel(logging.CRITICAL)
    try:
        anyio.run(_serve)
    except BrokenPipeError:  # the rebuild ended (or was cancelled) without waiting
        _quiet_stdout()
    except Exception as exc:  # noqa: BLE001 - told to the rebuilding process, which goes on
        try:
            _write({"error": f"{type(exc).__name__}: {exc}"})
        except BrokenPipeError:
            _quiet_stdout()
        raise SystemExit(1) from None


def _quiet_stdout() -> None:
    """Point stdout at the null device: its reader is gone, and flushing it at exit would
    only print a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
