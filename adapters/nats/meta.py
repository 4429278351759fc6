"""The NATS backend's published step definitions and snapshots: the bucket ``NAME_meta``,
keys ``def.<step>`` and ``snap.<execution>`` (both derived and rebuildable)."""

from __future__ import annotations

from stepsource.adapters.nats.jetstream import JetStream
from stepsource.adapters.nats.wire import (
    Stored,
    decode_definition,
    decode_snapshot,
    encode_definition,
    encode_snapshot,
)
from stepsource.adapters.ports import Snapshot
from stepsource.errors import CorruptLogError, LimitExceededError

__all__ = ["NatsMeta"]


class NatsMeta:
    """Step definitions by step id, and each execution's newest snapshot."""

    def __init__(self, js: JetStream) -> None:
        self.js = js
        self.connection = js.connection
        self.layout = js.layout

    async def _meta_put(self, subject: str, payload: bytes, expect: int | None) -> bool:
        if expect is None:
            await self.js.publish(subject, payload, {})
            return True
        stream = self.layout.meta_stream
        return await self.js.publish_if(stream, subject, payload, {}, expect) is not None

    async def publish_definition(self, step_id: str, version: str, data: bytes) -> None:
        payload = encode_definition(version, bytes(data))
        await self.connection.guard(
            self._meta_put(self.layout.meta_subject("def", step_id), payload, None),
            "publish a step definition",
        )

    async def published_definition(self, step_id: str) -> tuple[str, bytes] | None:
        stored: Stored | None = await self.connection.guard(
            self.js.get(
                self.layout.meta_stream, {"last_by_subj": self.layout.meta_subject("def", step_id)}
            ),
            "read a step definition",
        )
        if stored is None or not stored.data:
            return None
        try:
            return decode_definition(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the published definition of {step_id!r} is damaged ({exc})"
            ) from None

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        payload = encode_snapshot(snapshot.version, snapshot.topic, bytes(snapshot.data))
        await self.connection.guard(self._save_snapshot(snapshot, payload), "save a snapshot")

    async def _save_snapshot(self, snapshot: Snapshot, payload: bytes) -> None:
        subject = self.layout.meta_subject("snap", snapshot.stream_id)
        while True:
            stored = await self.js.get(self.layout.meta_stream, {"last_by_subj": subject})
            if stored is not None and stored.data:
                kept = self._snapshot_of(snapshot.stream_id, stored)
                if kept.version > snapshot.version:
                    return
            try:
                done = await self._meta_put(subject, payload, stored.seq if stored else 0)
            except LimitExceededError as exc:
                raise LimitExceededError(
                    exc.reason, execution_id=snapshot.stream_id, hint=exc.hint
                ) from None
            if done:
                return

    def _snapshot_of(self, stream_id: str, stored: Stored) -> Snapshot:
        try:
            version, topic, data = decode_snapshot(stored.data)
        except ValueError as exc:
            raise CorruptLogError(
                f"the snapshot of the execution is damaged ({exc})", execution_id=stream_id
            ) from None
        return Snapshot(stream_id, version, topic, data)

    async def latest_snapshot(
        self, stream_id: str, max_version: int | None = None
    ) -> Snapshot | None:
        stored: Stored | None = await self.connection.guard(
            self.js.get(
                self.layout.meta_stream,
                {"last_by_subj": self.layout.meta_subject("snap", stream_id)},
            ),
            "read a snapshot",
        )
        if stored is None or not stored.data:
            return None
        snapshot = self._snapshot_of(stream_id, stored)
        if max_version is not None and snapshot.version > max_version:
            return None
        return snapshot
