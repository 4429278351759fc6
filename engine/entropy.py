"""Random values derived from an operation's coordinates and the engine's secret seed.

A checkpoint id, ``ctx.uuid4()`` or ``ctx.random()`` is a keyed hash (BLAKE2b) of the
execution id and the operation's (attempt, scope, seq): unpredictable without the seed (a
fresh random seed per Engine by default), recorded like any other result, and — with a fixed
seed, as ``stepsource.testing`` uses — the same in two runs of the same execution.
"""

from __future__ import annotations

import hashlib
import os
import uuid

from stepsource.aggregates.execution import OpCoordinates

__all__ = ["Entropy"]


class Entropy:
    def __init__(self, seed: bytes | None = None) -> None:
        self._seed = seed if seed is not None else os.urandom(32)

    def _digest(self, purpose: str, execution_id: str, op: OpCoordinates) -> bytes:
        attempt, scope, seq, _version = op
        message = f"{purpose}\x00{execution_id}\x00{attempt}\x00{scope}\x00{seq}".encode()
        return hashlib.blake2b(message, key=self._seed[:64], digest_size=16).digest()

    def uuid4(self, purpose: str, execution_id: str, op: OpCoordinates) -> uuid.UUID:
        return uuid.UUID(bytes=self._digest(purpose, execution_id, op), version=4)

    def random(self, execution_id: str, op: OpCoordinates) -> float:
        bits = int.from_bytes(self._digest("random", execution_id, op)[:7], "big") >> 3
        return bits / float(1 << 53)
