"""The checksum every stored event carries, so a damaged or misplaced row is refused on read.

The stored JSON of an event begins with ``{"_c":N,`` where ``N`` is the CRC-32 of the
stream id, the version, the topic and the JSON without that member. The checksum is inside
the plaintext (before encryption, which has its own authentication), so it needs no column
and no change to any backend: every backend stores it as it stores the rest of the data.

A record without the prefix is an event written before checksums existed and is read as it
always was, unless an earlier event of the same read carried one: a stream never goes back
from checked to unchecked, so damage to the prefix itself is caught too.
"""

from __future__ import annotations

import zlib

__all__ = [
    "HEAD",
    "PREFIX",
    "ChecksumMismatch",
    "add_checksum",
    "checksum",
    "stream_crc",
    "strip_checksum",
    "verify_checksum",
]

PREFIX = b'{"_c":'

#: what the checksum covers after the stream id's part (:func:`stream_crc`), before the
#: JSON without its checksum member: ``HEAD % (version, topic)`` (the topic as bytes), the
#: JSON's opening brace included (the rest of the stored JSON follows it after the comma)
HEAD = b"%d\x00%s\x00{"


def checksum(stream_id: str, version: int, topic: str, body: bytes) -> int:
    """The CRC-32 of an event's coordinates and its JSON (without the checksum member)."""
    head = f"{stream_id}\x00{version}\x00{topic}\x00".encode()
    return zlib.crc32(body, zlib.crc32(head))


def add_checksum(
    stream_id: str, version: int, topic: str, body: bytes, start_crc: int | None = None
) -> bytes:
    """``body`` (a JSON object) with the checksum as its first member. ``start_crc``:
    :func:`stream_crc` of ``stream_id``, when the caller encodes several events of it."""
    if start_crc is None:
        start_crc = stream_crc(stream_id)
    crc = zlib.crc32(body, zlib.crc32(f"{version}\x00{topic}\x00".encode(), start_crc))
    if body == b"{}":
        return b'{"_c":%d}' % crc
    return b"".join((b'{"_c":%d,' % crc, memoryview(body)[1:]))


class ChecksumMismatch(Exception):
    """The stored checksum does not match the event (raised with what was found)."""


_OPEN = zlib.crc32(b"{")


def stream_crc(stream_id: str) -> int:
    """The CRC-32 of a stream id's part of the checksum (computed once per stream read)."""
    return zlib.crc32(f"{stream_id}\x00".encode())


def verify_checksum(
    stream_id: str, version: int, topic: str, data: bytes, start_crc: int | None = None
) -> None:
    """Check the checksum of ``data`` (which begins with :data:`PREFIX`) without copying it;
    the JSON may then be parsed whole and its ``_c`` member dropped. Raises
    :class:`ChecksumMismatch`."""
    start = len(PREFIX)
    comma = data.find(b",", start, start + 12)
    if comma < 0 or not data[start:comma].isdigit():
        strip_checksum(stream_id, version, topic, data)  # the rare shapes, and their errors
        return
    if start_crc is None:
        start_crc = stream_crc(stream_id)
    crc = zlib.crc32(f"{version}\x00{topic}\x00{{".encode(), start_crc)
    if zlib.crc32(memoryview(data)[comma + 1 :], crc) != int(data[start:comma]):
        raise ChecksumMismatch("the checksum does not match the data")


def strip_checksum(stream_id: str, version: int, topic: str, data: bytes) -> tuple[bytes, bool]:
    """The event's JSON without its checksum, verified, and whether it had one.

    Raises :class:`ChecksumMismatch` when the checksum is malformed or does not match.
    """
    if not data.startswith(PREFIX):
        return data, False
    start = len(PREFIX)
    end = start
    length = len(data)
    while end < length and 48 <= data[end] <= 57:  # ASCII digits
        end += 1
    if end == start or end - start > 10 or end >= length or data[end] not in b",}":
        raise ChecksumMismatch("the checksum is malformed")
    stored = int(data[start:end])
    body = b"{}" if data[end] == 125 and end == length - 1 else b"{" + data[end + 1 :]
    if data[end] == 125 and end != length - 1:
        raise ChecksumMismatch("the data continues after the checksum's object")
    if checksum(stream_id, version, topic, body) != stored:
        raise ChecksumMismatch("the checksum does not match the data")
    return body, True
