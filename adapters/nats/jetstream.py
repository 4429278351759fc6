"""The JetStream API of a NATS backend: streams, publishes with their acks, direct gets.

:class:`JetStream` stands to :class:`~stepsource.adapters.nats.connection.NatsConnection` as
nats-py's ``JetStreamContext`` stands to its ``Client``: the parts of the backend (log,
queue, inbox, metadata, key-value store) call it, and it calls the connection. It creates
(or checks) the tenant's streams and buckets on every new connection, and reads the way
the number of replicas requires: a direct get on one replica, the leader's get on more.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client

from stepsource.adapters.nats.connection import NatsConnection
from stepsource.adapters.nats.replies import Batch, parse_headers
from stepsource.adapters.nats.wire import WRONG_LAST, JsError, Layout, Stored, Transient
from stepsource.errors import BackendUnavailableError, UsageError

__all__ = ["JetStream"]

_RETRY_CODES = (10163, 10008, 10009)  # try again; cluster not ready; not the leader
_NS = 1_000_000_000


class JetStream:
    """The JetStream API over one connection, for the tenant's :class:`Layout`."""

    def __init__(self, connection: NatsConnection) -> None:
        self.connection = connection
        self.layout = Layout(connection.options.stream)
        self.replicas = 1  # of the streams, known once connected
        connection.on_connect(self._create_streams)

    async def api(
        self, subject: str, body: dict[str, Any], *, nc: Client | None = None
    ) -> dict[str, Any]:
        """A JetStream API call; errors become :class:`JsError` (transient ones retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connection.operation_timeout
        delay = 0.05
        while True:
            msg = await self.connection.request(subject, orjson.dumps(body), nc=nc)
            reply: dict[str, Any] = orjson.loads(msg.data)
            error = reply.get("error")
            if error is None:
                return reply
            failure = JsError(
                int(error.get("code", 0)),
                int(error.get("err_code", 0)),
                error.get("description", ""),
            )
            if failure.code != 503 and failure.err_code not in _RETRY_CODES:
                raise failure
            if loop.time() + delay > deadline:
                raise Transient(str(failure))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], *, retry: bool = True
    ) -> int:
        """Publish into a stream and wait for the ack; return the message's sequence."""
        return self.ack_sequence(
            await self.connection.request(subject, payload, headers, retry=retry)
        )

    def ack_sequence(self, ack: Any) -> int:
        """The sequence a publish acknowledgement gives, or its error raised."""
        if ack.headers and ack.headers.get("Status") == "503":
            raise Transient("no responders: the stream is not available")
        reply: dict[str, Any] = orjson.loads(ack.data)
        error = reply.get("error")
        if error is not None:
            code, err_code = int(error.get("code", 0)), int(error.get("err_code", 0))
            if code == 503 or err_code in _RETRY_CODES:
                raise Transient(error.get("description", "unavailable"))
            raise JsError(code, err_code, error.get("description", ""))
        return int(reply["seq"])

    async def publish_if(
        self, stream: str, subject: str, payload: bytes, headers: dict[str, str], expect: int
    ) -> int | None:
        """Publish only if the subject's last message is still ``expect`` (0: none); the new
        sequence, or None if another write came first. A retry after a lost ack that is
        refused reads the subject back: if its last message is ours, the write happened."""
        msg_id = uuid.uuid4().hex
        headers = {
            **headers,
            "Nats-Msg-Id": msg_id,
            "Nats-Expected-Last-Subject-Sequence": str(expect),
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connection.operation_timeout
        delay, unsure = 0.02, False
        while True:
            try:
                return await self.publish(subject, payload, headers, retry=False)
            except JsError as exc:
                if exc.err_code not in WRONG_LAST:
                    raise
                if unsure:
                    last = await self.get(stream, {"last_by_subj": subject})
                    if last is not None and last.headers.get("Nats-Msg-Id") == msg_id:
                        return last.seq
                return None
            except Transient:
                unsure = True
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def get(self, stream: str, body: dict[str, Any]) -> Stored | None:
        """One message (None if there is none), read so that it reflects every write this
        object saw acknowledged: a direct get on one replica, the leader's get on more."""
        await self.connection.client()  # the number of replicas is known once connected
        if self.replicas == 1:
            msg = await self.connection.request(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(body))
            headers = dict(msg.headers or {})
            status = headers.get("Status")
            if status == "404":
                return None
            if status:
                raise Transient(f"direct get answered {status} {headers.get('Description')}")
            return Stored(int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data)
        try:
            reply = await self.api(f"$JS.API.STREAM.MSG.GET.{stream}", body)
        except JsError as exc:
            if exc.code == 404:
                return None
            raise
        message = reply["message"]
        raw_headers = base64.b64decode(message.get("hdrs") or b"")
        return Stored(
            int(message["seq"]),
            str(message["subject"]),
            parse_headers(raw_headers) if raw_headers else {},
            base64.b64decode(message.get("data") or b""),
        )

    async def batch(self, stream: str, body: dict[str, Any]) -> tuple[list[Stored], bool]:
        """Up to ``body['batch']`` messages by one batched direct get; also whether more
        match after them. Served by any replica: it may lag behind the leader. Retried with
        backoff when no answer comes (a read changes nothing), and as
        :meth:`NatsConnection.request` does, when the connection cannot be made again after
        that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connection.operation_timeout
        delay, failed = 0.02, False
        while True:
            try:
                return await self._batch_once(stream, body)
            except Transient:
                if loop.time() + delay > deadline:
                    raise
                failed = True
            except BackendUnavailableError:
                if not failed or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _batch_once(self, stream: str, body: dict[str, Any]) -> tuple[list[Stored], bool]:
        nc = await self.connection.client()
        try:
            replies = await self.connection.replies(nc)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None
        token = replies.token()
        batch = replies.waiting[token] = Batch(asyncio.get_running_loop())
        try:
            await nc.publish(
                f"$JS.API.DIRECT.GET.{stream}",
                orjson.dumps(body),
                reply=f"{replies.prefix}.{token}",
            )
            while True:  # a timeout counts from the last message, as for one message
                seen = batch.seen
                await asyncio.wait((batch.done,), timeout=self.connection.request_timeout)
                if batch.done.done():
                    return batch.done.result()
                if batch.seen == seen:
                    raise Transient("no answer to a batched direct get in time")
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
        ) as exc:
            raise Transient(str(exc) or type(exc).__name__) from None
        finally:
            replies.waiting.pop(token, None)

    async def _create_streams(self, nc: Client) -> None:
        duplicate_window = 120 * _NS
        layout = self.layout
        name = self.connection.options.stream
        replicas = self.connection.options.replicas or 1
        common = {"storage": "file", "num_replicas": replicas, "allow_direct": True}
        kv = {
            **common,
            "max_msgs_per_subject": 1,
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "discard": "new",
            "duplicate_window": duplicate_window,
        }
        configs = [
            {
                **common,
                "name": self.layout.events,
                "subjects": [f"{name}.ev.>"],
                "deny_delete": True,
                "deny_purge": True,
                "duplicate_window": duplicate_window,
            },
            {
                **common,
                "name": self.layout.inbox,
                "subjects": [f"{name}.in.>"],
                "duplicate_window": duplicate_window,
            },
            *(
                {**kv, "name": f"KV_{bucket}", "subjects": [f"$KV.{bucket}.>"]}
                for bucket in (layout.queue_bucket, layout.meta_bucket, layout.kv_bucket)
            ),
        ]
        found = 1
        for config in configs:
            stream = str(config["name"])
            try:
                info = await self.api(f"$JS.API.STREAM.CREATE.{stream}", config, nc=nc)
            except JsError as exc:
                if exc.err_code == 10074:
                    raise UsageError(
                        f"the NATS server at {self.connection.where()} is not clustered: it "
                        f"cannot keep {replicas} replicas of the stream {stream}",
                        hint="Drop replicas= from the URL (or use replicas=1)",
                    ) from None
                if exc.err_code != 10058:  # not "exists with another configuration"
                    raise self.connection.unavailable(f"create the stream {stream}", exc) from None
                info = await self.api(f"$JS.API.STREAM.INFO.{stream}", {}, nc=nc)
                self._check_existing(config, info["config"])
            found = max(found, int(info["config"].get("num_replicas", 1)))
        self.replicas = found

    def _check_existing(self, wanted: dict[str, Any], actual: dict[str, Any]) -> None:
        stream = wanted["name"]
        if sorted(actual.get("subjects") or []) != sorted(wanted["subjects"]):
            raise UsageError(
                f"the JetStream stream {stream} exists with subjects {actual.get('subjects')}, "
                f"not {wanted['subjects']}",
                hint="It belongs to something else: choose another ?stream= name",
            )
        has = int(actual.get("num_replicas", 1))
        if self.connection.options.replicas is not None and has != self.connection.options.replicas:
            raise UsageError(
                f"the JetStream stream {stream} has {has} replicas, the URL asks for "
                f"{self.connection.options.replicas}",
                hint="Drop replicas= from the URL, or change the stream with the nats CLI",
            )

    async def stream_info(self) -> dict[str, Any]:
        """The event log's JetStream stream info (config, state, and on a cluster the
        ``cluster`` section naming its leader and replicas), as the server reports it."""
        info: dict[str, Any] = await self.connection.guard(
            self.api(f"$JS.API.STREAM.INFO.{self.layout.events}", {}), "describe the event log"
        )
        return info
