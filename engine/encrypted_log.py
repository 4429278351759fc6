"""Refusing to use an encrypted log without its key.

A process without the cipher key reads an encrypted log as damage and would write plaintext
into it: a start's input or a message's payload stored in clear beside encrypted records,
which the workers that have the key then cannot read (the execution set aside, never run),
and an executions index that folds every execution as unreadable. :func:`require_key` looks
at the log's last records once per store: if most of them are encrypted and this process has
no key, it refuses with the fix (the key), before anything is written or folded.
"""

from __future__ import annotations

import weakref

from stepsource.engine.store import ExecutionStore
from stepsource.errors import UsageError

__all__ = ["SAMPLE", "require_key"]

#: the last records of the log looked at (most of them encrypted: the log is)
SAMPLE = 8

#: stores found to be usable (they have the key, or their log is not encrypted)
_CHECKED: weakref.WeakSet[ExecutionStore] = weakref.WeakSet()


def _sealed(data: object) -> bool:
    """Whether stored bytes are an encrypted record: a plaintext one is a JSON object with
    keys (an encrypted one starts with a random nonce: these two bytes 1 time in 65,536)."""
    return type(data) is bytes and not data.startswith(b'{"')


async def require_key(store: ExecutionStore, doing: str) -> None:
    """UsageError if ``store`` has no cipher key and its log is encrypted (``doing``: what
    would go wrong, for the message); checked once per store."""
    if store.codec.encrypted or store in _CHECKED:
        return
    last = await store.backend.max_position()
    if last > 0:
        records = await store.backend.read_all(max(0, last - SAMPLE), SAMPLE)
        sealed = sum(_sealed(record.data) for record in records)
        if sealed * 2 > len(records):  # a damaged plaintext record or two is not a cipher
            raise UsageError(
                f"the log is encrypted and this process has no cipher key: {doing}",
                hint="Pass cipher_key= to the Engine (or set STEPSOURCE_CIPHER_KEY) with the "
                "key the log was written with",
            )
    _CHECKED.add(store)
