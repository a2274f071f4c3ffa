"""`RabbitMQBroker`: the broker on RabbitMQ 3.10+ quorum queues (`amqp://host:5672/vhost`).

A topic is a direct exchange, `tidings:<topic>`. A group is `shards` (8 by default) durable
quorum queues with `x-single-active-consumer`, `tidings:<topic>:<group>:<n>`, bound with
routing key `<n>`, plus one quorum queue `tidings:<topic>:<group>:any` bound with `any`. A
keyed message is published with routing key `crc32(key) % shards`, a keyless one with `any`,
so one key always lands in one shard queue, in publish order, and each group gets every
message published after it was declared. All clients of a topic must agree on `shards`. No
plugin is needed. Messages are persistent and each publish waits for its publisher confirm;
a few retries (each bounded by `publish_timeout`) cover a reconnect, then
`RabbitMQBrokerError` (a `BrokerError`). Events are CloudEvents in binary mode with the AMQP
binding's `cloudEvents_` headers (`cloudEvents:` is read too; a `time` sent as an AMQP
timestamp or as milliseconds is understood); the content type is the AMQP property. The
headers travel in one AMQP frame: a message whose headers (its metadata) encode to more than
`MAX_HEADERS_SIZE` (the default `frame_max`, 128 KiB, less room for the other properties) is
refused with a `RabbitMQBrokerError` saying so before anything is sent; sent, RabbitMQ would
close the whole connection with a `FRAME_ERROR`.

A member of a group opens one channel per queue of the group (`shards + 1`, prefetch each)
and consumes all of them; it creates no queues of its own. RabbitMQ gives each shard queue to
one member at a time (the single active consumer), so a key is never in two members' hands,
and within a member a key's next message waits while one is in its hands. The `any` queue is
shared by all members (plain competing consumers, no order). Members share the shards out:
the number of members is the consumer count of the `any` queue, and a member active on more
than `ceil(shards / members)` shards gives the extra ones away: it stops handing out their
messages, waits until those it handed out are settled, then closes that shard's channel, which
in one step returns what it had buffered (ahead of newer messages) and activates the next
member in line; it then consumes the shard again at the back of the line. It checks its share
when it becomes active on a shard, and every `rebalance` seconds while active on several.
A member that leaves or dies loses its shards the same way, with what it held unacked.

`attempt` is the quorum queue's `x-delivery-count` plus one (a classic queue only says
"redelivered": 2). Messages a member had buffered but never handed out are counted by
RabbitMQ when returned; the process remembers them and does not count them, another process
does (such a message may say attempt 2 without having been handled). `nack()` puts the
message back at the head of its key in the member's buffer, held unacked; with a `delay` it
is handed out again (to this member; the rest of its key waits) once the delay is over. If
the member leaves or dies meanwhile, another gets it at once.

Dead letters are JSON records published to the fanout exchange `tidings.dlx` and kept in the
quorum queue `tidings.dlq`; the group queues dead-letter to the same exchange, so a message
RabbitMQ itself rejects (say, a foreign consumer's `reject` without requeue) is listed too.
Listing takes every record without acking and closes the channel (RabbitMQ puts them back),
under a lock (an exclusive consumer of `tidings.dlq.lock`) so two processes never see half
each; dropping one acks it. Replaying publishes the message through the default exchange to
the group's own shard queue, so only that group sees it again.

Groups are durable. With `expires` (seconds), RabbitMQ deletes a group's queues, with their
messages, once nobody used them for that long, and the topic exchanges are auto-delete (gone
with their last group); dead letters then expire after `dead_letter_max_age` (by default the
same) too: for tests and throwaway groups. Such groups are classic queues unless
`queue_type=quorum` says otherwise: every quorum queue reserves three of RabbitMQ's file
handles (`file_handle_cache`, about 900 with the common limit of 1024 descriptors) for as
long as it exists, and when they run out RabbitMQ accepts no more connections; a test run
makes some 170 group queues that live a minute, an idle classic queue holds no handle. The
connection is aio-pika's `connect_robust`: after a drop the member channels reopen and
consume again by themselves, and what was in flight comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tidings.brokers.base import BrokerBase, DeadLetter, Received
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError, InvalidCloudEvent
from tidings.store.base import url_options

__all__ = ["RabbitMQBroker", "RabbitMQBrokerError"]

log = logging.getLogger("tidings.brokers.rabbitmq")

DLX = "tidings.dlx"  # the dead-letter exchange (fanout)
DLQ = "tidings.dlq"  # where dead letters are kept
DLQ_LOCK = "tidings.dlq.lock"  # its exclusive consumer is the lock for listing them
_ANY = "any"  # the routing key and queue suffix of keyless messages
_RECORD_HEADER = "x-tidings-dead-letter"
_MAX_NAME = 255
_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
_CLOSE_TIMEOUT = 5.0
_OPTIONS: dict[str, type] = {
    "shards": int,
    "queue_type": str,
    "expires": float,
    "dead_letter_max_age": float,
    "rebalance": float,
    "heartbeat": int,
    "publish_timeout": float,
    "publish_attempts": int,
    "connect_timeout": float,
}
_FAILURES = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aiormq's "<Connection ...> closed": a channel asked of a dropped connection
)
MAX_HEADERS_SIZE = 131_072 - 1_024
"""Bytes the AMQP headers table of one message may take: RabbitMQ's default `frame_max`
less room for the frame and the other properties (content type, message id, ...)."""
# Closing or settling on a channel (or connection) that is going or gone.
_GONE = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError, RuntimeError)


class RabbitMQBrokerError(BrokerError):
    """RabbitMQ failed: unreachable after the bounded retries, or it refused an operation."""


class RabbitMQBroker(BrokerBase):
    """A broker on RabbitMQ quorum queues; see the module docstring for the design.

    Options (keyword or URL query): `shards` queues per group for keyed messages (8; keep it
    fixed while messages are in flight), `queue_type` of the group queues (`quorum`, or
    `classic` when `expires` is set), `expires` seconds a group's queues survive unused (0:
    forever), `dead_letter_max_age` seconds dead letters are kept (default: `expires`; 0:
    forever), `rebalance` seconds between a busy member's checks of its share of the shards
    (1), AMQP `heartbeat` seconds (30), `publish_timeout` (5 s), `publish_attempts` (4),
    `connect_timeout` (5 s).
    """

    header_prefix = "cloudEvents_"

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        codec: JSONCodec | None = None,
        source: str = "tidings",
        shards: int = 8,
        queue_type: str | None = None,
        expires: float = 0.0,
        dead_letter_max_age: float | None = None,
        rebalance: float = 1.0,
        heartbeat: int = 30,
        publish_timeout: float = 5.0,
        publish_attempts: int = 4,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__(codec=codec, source=source)
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024:
            raise ConfigurationError(f"shards must be 1-1024, got {shards!r}")
        for name, value in (
            ("rebalance", rebalance),
            ("publish_timeout", publish_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be positive, got {value!r}")
        if expires < 0 or (dead_letter_max_age or 0) < 0 or heartbeat < 0:
            raise ConfigurationError("expires, dead_letter_max_age and heartbeat must be >= 0")
        if queue_type not in (None, "quorum", "classic"):
            raise ConfigurationError(f"queue_type must be quorum or classic, got {queue_type!r}")
        if publish_attempts < 1:
            raise ConfigurationError(f"publish_attempts must be at least 1: {publish_attempts}")
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("amqp", "amqps"):
            raise ConfigurationError(f"a RabbitMQ URL starts with amqp://, got {url!r}")
        self.url = urlunsplit(parts._replace(query=""))
        self.shards = shards
        self.queue_type = queue_type or ("classic" if expires else "quorum")
        self.expires = expires
        self.dead_letter_max_age = expires if dead_letter_max_age is None else dead_letter_max_age
        self.rebalance = rebalance
        self.heartbeat = heartbeat
        self.publish_timeout = publish_timeout
        self.publish_attempts = publish_attempts
        self.connect_timeout = connect_timeout
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._admin: aio_pika.abc.AbstractChannel | None = None  # declares and publishes
        self._admin_lock = asyncio.Lock()
        self._dlq_lock = asyncio.Lock()
        self._topics: set[str] = set()  # exchanges declared by this broker
        self._groups: dict[tuple[str, str], float] = {}  # declared, when (monotonic)
        self._foreign: set[str] = set()  # queues that exist with other arguments
        self._members: dict[str, _Member] = {}
        self._returned: dict[tuple[str, str], int] = {}  # (queue, id) -> returned untaken

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQBroker:
        if urlsplit(url).scheme.lower() not in ("amqp", "amqps"):
            raise ConfigurationError(f"a RabbitMQ URL starts with amqp://, got {url!r}")
        return cls(url, **(url_options(url, _OPTIONS) | options))

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    timeout=self.connect_timeout,
                    heartbeat=self.heartbeat,
                    reconnect_interval=1,
                    client_properties={"connection_name": "tidings"},
                )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, ValueError) as exc:
            raise RabbitMQBrokerError(
                f"cannot connect to RabbitMQ at {self._where()}: {_describe(exc)}"
            ) from exc
        try:
            await self._admin_call(self._declare_dead_letters, "declare the dead-letter queue")
        except BaseException:
            await self._close_connection()
            raise

    async def _declare_dead_letters(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT, durable=True)
        dlq = await channel.declare_queue(DLQ, durable=True, arguments=_QUORUM)
        await dlq.bind(DLX, routing_key="")
        await channel.declare_queue(DLQ_LOCK, durable=True)

    async def _close(self) -> None:
        for name in list(self._members):
            await self._leave_member(name)
        admin, self._admin = self._admin, None
        await _close(admin)
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(*_GONE):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await connection.close()

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"

    def _conn(self) -> aio_pika.abc.AbstractRobustConnection:
        if self._connection is None:
            raise RabbitMQBrokerError("the RabbitMQ broker is not connected")
        return self._connection

    async def _plain_channel(self, *, confirms: bool = False) -> aio_pika.abc.AbstractChannel:
        """A channel that is not restored after a reconnect (for short-lived work)."""
        channel = aio_pika.Channel(self._conn(), publisher_confirms=confirms)
        await channel.initialize(timeout=self.publish_timeout)
        return channel

    async def _admin_channel(self) -> aio_pika.abc.AbstractChannel:
        async with self._admin_lock:
            if self._admin is None or self._admin.is_closed:
                self._admin = await self._plain_channel(confirms=True)
            return self._admin

    async def _reset_admin(self) -> None:
        admin, self._admin = self._admin, None
        await _close(admin)

    async def _admin_call(self, action: Any, what: str) -> Any:
        """`action(channel)` on the admin channel, bounded; a failure is a
        `RabbitMQBrokerError` (and a fresh channel next time)."""
        try:
            async with asyncio.timeout(self.publish_timeout * 2):
                return await action(await self._admin_channel())
        except Exception as exc:
            if not _link_failure(exc, _FAILURES):
                raise
            await self._reset_admin()
            raise RabbitMQBrokerError(f"cannot {what} on RabbitMQ: {_describe(exc)}") from exc

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        exchange = _name(topic)
        await self._send([(exchange, self._route(m.key), self._amqp(m)) for m in messages], topic)

    def _route(self, key: str | None) -> str:
        return _ANY if key is None else str(zlib.crc32(key.encode()) % self.shards)

    def _amqp(self, message: Message) -> aio_pika.Message:
        headers: dict[str, Any] = dict(message.binary_headers(self.header_prefix))
        content_type = headers.pop("content-type")
        size = 4 + sum(6 + len(k.encode()) + len(str(v).encode()) for k, v in headers.items())
        if size > MAX_HEADERS_SIZE:  # the encoded AMQP table, exactly for text values
            raise RabbitMQBrokerError(
                f"message {message.id} to {message.topic!r}: its {len(headers):,} headers (the "
                f"event's metadata) encode to {size:,} bytes, over the {MAX_HEADERS_SIZE:,} "
                "one RabbitMQ frame carries (frame_max); send less metadata"
            )
        return aio_pika.Message(
            message.data,
            headers=headers,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.id or None,
        )

    async def _send(
        self, sends: list[tuple[str, str, aio_pika.Message]], topic: str | None = None
    ) -> None:
        """Publish `(exchange, routing key, message)`s in order and return once RabbitMQ
        confirmed them all; what was not confirmed is sent again (at least once)."""
        failure: BaseException | None = None
        delay = 0.05
        for attempt in range(1, self.publish_attempts + 1):
            try:
                async with asyncio.timeout(self.publish_timeout):
                    channel = await self._admin_channel()
                    if topic is not None and topic not in self._topics:
                        await self._declare_topic(channel, topic)
                        channel = await self._admin_channel()
                    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
                    for name, _, _ in sends:
                        if name not in exchanges:
                            exchanges[name] = (
                                channel.default_exchange
                                if name == ""
                                else await channel.get_exchange(name, ensure=False)
                            )
                    results = await asyncio.gather(
                        *(exchanges[name].publish(m, routing_key=key) for name, key, m in sends),
                        return_exceptions=True,
                    )
                errors = [r for r in results if isinstance(r, BaseException)]
                if not errors:
                    return
                sends = sends[results.index(errors[0]) :]  # those before it are confirmed
                failure = errors[0]
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
            except Exception as exc:
                if not _link_failure(exc, _FAILURES):
                    raise
                failure = exc
            if isinstance(failure, aiormq.exceptions.ChannelNotFoundEntity) and topic:
                self._topics.discard(topic)  # the exchange went (auto-delete): declare again
            await self._reset_admin()
            if attempt < self.publish_attempts:
                log.warning("publishing to RabbitMQ failed (%s); retrying", _describe(failure))
                await asyncio.sleep(delay)
                delay = min(delay * 4, 1.0)
        raise RabbitMQBrokerError(
            f"RabbitMQ at {self._where()} did not confirm {len(sends)} message(s) after "
            f"{self.publish_attempts} attempts: {_describe(failure)}"
        )

    # -- groups and members ----------------------------------------------------------------

    def _queue(self, topic: str, group: str, route: str) -> str:
        return _name(topic, group, route)

    def _queue_arguments(self, route: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": self.queue_type,
            "x-dead-letter-exchange": DLX,
        }
        if route != _ANY:
            arguments["x-single-active-consumer"] = True
        if self.expires:
            arguments["x-expires"] = max(1, int(self.expires * 1000))
        return arguments

    def _routes(self) -> list[str]:
        return [str(n) for n in range(self.shards)] + [_ANY]

    async def _declare_topic(self, channel: aio_pika.abc.AbstractChannel, topic: str) -> None:
        """The topic's exchange; one that exists with other flags is used as it is."""
        try:
            await channel.declare_exchange(
                _name(topic),
                aio_pika.ExchangeType.DIRECT,
                durable=True,
                auto_delete=bool(self.expires),
            )
        except aiormq.exceptions.ChannelPreconditionFailed:
            await self._reset_admin()
            channel = await self._admin_channel()
            await channel.declare_exchange(_name(topic), passive=True)
        self._topics.add(topic)

    async def _declare(self, topic: str, group: str) -> None:
        declared = self._groups.get((topic, group))
        now = time.monotonic()
        if declared is not None and (not self.expires or now - declared < self.expires / 2):
            return

        async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
            await self._declare_topic(channel, topic)
            for route in self._routes():
                await self._declare_queue(topic, group, route)

        await self._admin_call(declare, f"declare group {group!r} on {topic!r}")
        self._groups[(topic, group)] = now

    async def _declare_queue(
        self,
        topic: str,
        group: str,
        route: str,
        channel: aio_pika.abc.AbstractChannel | None = None,
    ) -> aio_pika.abc.AbstractQueue:
        """Declare and bind one queue of a group on `channel` (default: the admin channel).
        One that exists with other arguments is used as it is (a warning says so)."""
        name = self._queue(topic, group, route)
        target = channel or await self._admin_channel()
        if name in self._foreign:
            queue = await target.declare_queue(name, passive=True)
        else:
            try:
                queue = await target.declare_queue(
                    name, durable=True, arguments=self._queue_arguments(route)
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if channel is not None:
                    raise
                log.warning("queue %s exists with other arguments; using it: %s", name, exc)
                self._foreign.add(name)
                await self._reset_admin()
                target = await self._admin_channel()
                queue = await target.declare_queue(name, passive=True)
        await queue.bind(_name(topic), routing_key=route)
        return queue

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        consumer = _Member(self, topic, group, member, max(1, prefetch))
        self._members[member] = consumer
        await consumer.start()
        while not (consumer.stopped or self._closed):
            received, soonest = consumer.take()
            if received is not None:
                yield received
                continue
            consumer.changed.clear()
            timeout = 1.0 if soonest is None else min(1.0, max(0.001, soonest - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await consumer.changed.wait()

    async def _leave(self, topic: str, group: str, member: str) -> None:
        await self._leave_member(member)

    async def _leave_member(self, member: str) -> None:
        consumer = self._members.pop(member, None)
        if consumer is not None:
            await consumer.stop()

    def _returned_untaken(self, queue: str, message_id: str) -> None:
        """A message a member had buffered but never handed out goes back to RabbitMQ,
        which counts it as a delivery: its next delivery here does not count it."""
        if message_id:
            key = (queue, message_id)
            self._returned[key] = self._returned.get(key, 0) + 1
            while len(self._returned) > 100_000:  # those another process took meanwhile
                del self._returned[next(iter(self._returned))]

    def _attempt(self, queue: str, message_id: str, incoming: Any) -> int:
        counted = (incoming.headers or {}).get("x-delivery-count")
        deliveries = int(counted) if isinstance(counted, int) else int(incoming.redelivered)
        discount = self._returned.pop((queue, message_id), 0) if message_id else 0
        return max(1, deliveries + 1 - discount)

    def _decode(self, topic: str, incoming: aio_pika.abc.AbstractIncomingMessage) -> Message:
        headers = _text_headers(incoming.headers or {}, self.header_prefix)
        if incoming.content_type:
            headers["content-type"] = incoming.content_type
        prefix = self.header_prefix
        try:
            return Message.from_binary(topic, headers, incoming.body, prefix=prefix)
        except InvalidCloudEvent:  # no CloudEvent at all: let the consumer dead-letter it
            return Message(topic, {}, incoming.body, None, headers)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        self._groups.pop((dead.topic, dead.group), None)  # make sure its queues exist
        await self._declare(dead.topic, dead.group)
        queue = self._queue(dead.topic, dead.group, self._route(dead.message.key))
        await self._send([("", queue, self._amqp(dead.message))])

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        amqp = aio_pika.Message(
            json.dumps(dead.to_dict(), ensure_ascii=False, default=str).encode(),
            headers={_RECORD_HEADER: "1"},
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=dead.id,
            expiration=self.dead_letter_max_age or None,
        )
        await self._send([(DLX, dead.topic, amqp)])

    async def _dead_letters(self) -> list[DeadLetter]:
        return await self._browse(None)

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        await self._browse(dead_letter_id)

    async def _browse(self, drop: str | None) -> list[DeadLetter]:
        """Every dead letter, oldest first: take them all unacked and give them back by
        closing the channel (but the one with id `drop`, which is acked), under the lock."""
        async with self._dlq_lock:
            try:
                async with asyncio.timeout(30 + self.publish_timeout * 2):
                    lock = await self._lock()
                    try:
                        return await self._read_dead_letters(drop)
                    finally:
                        await _close(lock)
            except Exception as exc:
                if not _link_failure(exc, _FAILURES):
                    raise
                raise RabbitMQBrokerError(
                    f"cannot read the dead letters: {_describe(exc)}"
                ) from exc

    async def _read_dead_letters(self, drop: str | None) -> list[DeadLetter]:
        channel = await self._plain_channel()
        try:
            queue = await channel.declare_queue(DLQ, durable=True, arguments=_QUORUM)
            result = queue.declaration_result
            count = result.message_count if result and result.message_count else 0
            found: list[DeadLetter] = []
            for _ in range(count):
                incoming = await queue.get(no_ack=False, fail=False, timeout=5)
                if incoming is None:
                    break
                try:
                    dead = self._dead_letter(incoming)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("skipping an unreadable dead letter: %s", exc)
                    continue
                if dead.id == drop:
                    await incoming.ack()
                else:
                    found.append(dead)
            found.sort(key=lambda dead: dead.failed_at)  # stable: queue order on ties
            return found
        finally:
            await _close(channel)  # everything taken and not acked goes back

    async def _lock(self) -> aio_pika.abc.AbstractChannel:
        """A channel holding the exclusive consumer of the dead-letter lock queue."""
        deadline = time.monotonic() + 30
        while True:
            channel = await self._plain_channel()
            try:
                queue = await channel.get_queue(DLQ_LOCK, ensure=False)
                await queue.consume(_ignore, exclusive=True)
                return channel
            except aiormq.exceptions.ChannelAccessRefused:
                await _close(channel)
                if time.monotonic() > deadline:
                    raise RabbitMQBrokerError("the dead letters stayed locked for 30 s") from None
                await asyncio.sleep(0.02 + random.random() * 0.03)
            except BaseException:
                await _close(channel)
                raise

    def _dead_letter(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> DeadLetter:
        if (incoming.headers or {}).get(_RECORD_HEADER) is not None:
            return DeadLetter.from_dict(json.loads(incoming.body))
        # Dead-lettered by RabbitMQ itself: the message as it was, with the reason.
        headers = incoming.headers or {}
        queue = _text(headers.get("x-first-death-queue")) or ""
        parts = queue.split(":")
        topic, group = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
        message = self._decode(topic, incoming)
        reason = _text(headers.get("x-first-death-reason")) or "rejected"
        counted = headers.get("x-delivery-count")
        stamp = incoming.timestamp
        dead_id = incoming.message_id or str(uuid.uuid5(uuid.NAMESPACE_OID, repr(incoming.body)))
        return DeadLetter(
            dead_id,
            topic,
            group,
            f"dead-lettered by RabbitMQ ({reason}) from {queue or 'a queue'}",
            (counted if isinstance(counted, int) else 0) + 1,
            stamp.astimezone(UTC) if isinstance(stamp, datetime) else datetime.now(UTC),
            message,
        )


# -- members ----------------------------------------------------------------------------------


class _Lane:
    """One queue of a group as one member consumes it, on its own channel."""

    def __init__(self, route: str, queue: str) -> None:
        self.route = route
        self.queue = queue
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.active = False  # a message came on this channel: the member has the shard
        self.giving = False  # giving the shard away: hand out nothing more from it
        self.held = 0  # its messages in the member's hands
        self.settled = asyncio.Event()


class _Entry:
    def __init__(
        self,
        lane: _Lane,
        incoming: aio_pika.abc.AbstractIncomingMessage,
        message: Message,
        message_id: str,
        attempt: int,
    ) -> None:
        self.lane = lane
        self.incoming = incoming
        self.message = message
        self.id = message_id
        self.attempt = attempt
        self.taken = False  # handed out at least once
        self.not_before = 0.0  # monotonic; after a nack with a delay

    @property
    def stale(self) -> bool:
        """Its channel is gone (a reconnect): RabbitMQ delivers it again."""
        try:
            return bool(self.incoming.channel.is_closed)
        except aiormq.exceptions.ChannelInvalidStateError:
            return True


class _AMQPReceived(Received):
    def __init__(self, member: _Member, entry: _Entry) -> None:
        self.member = member
        self.entry = entry
        self.message = entry.message
        self.attempt = entry.attempt

    async def ack(self) -> None:
        try:  # before releasing it: that may let a give-away close the channel
            await self.entry.incoming.ack()
        except Exception as exc:
            if not _link_failure(exc, _GONE):
                raise
            log.warning(
                "%s/%s: message %s was not acked (%s); it comes again",
                self.member.topic,
                self.member.group,
                self.entry.id,
                _describe(exc),
            )
        finally:
            self.member.release(self.entry)

    async def nack(self, delay: float | None) -> None:
        self.member.requeue(self.entry, delay or 0.0)


class _Member:
    """One member of a group: a channel per queue of the group, a buffer, its shard share."""

    def __init__(
        self, broker: RabbitMQBroker, topic: str, group: str, name: str, prefetch: int
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.name = name
        self.prefetch = prefetch
        self.shards = [
            _Lane(str(n), broker._queue(topic, group, str(n))) for n in range(broker.shards)
        ]
        self.any = _Lane(_ANY, broker._queue(topic, group, _ANY))
        self.buffer: list[_Entry] = []
        self.keys: set[str] = set()  # keys of the messages in the member's hands
        self.held = 0
        self.changed = asyncio.Event()
        self.check = asyncio.Event()  # look at the share of shards now
        self.stopped = False
        self.tasks: set[asyncio.Task[None]] = set()

    # -- joining and leaving -----------------------------------------------------------------

    async def start(self) -> None:
        await self._consume(self.any)  # counted as a member from now on
        # Join the shards in an order of its own, so members starting together share them.
        offset = random.randrange(len(self.shards))
        order = self.shards[offset:] + self.shards[:offset]
        await asyncio.gather(*(self._consume(lane) for lane in order))
        if len(self.shards) > 1:
            self._spawn(self._share(), "share")

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.changed.set()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for entry in self.buffer:
            if not entry.taken:
                self.broker._returned_untaken(entry.lane.queue, entry.id)
        self.buffer.clear()
        channels = []
        for lane in [*self.shards, self.any]:
            channels.append(lane.channel)
            lane.channel = None
        await asyncio.gather(*(_close(channel) for channel in channels))

    def _spawn(self, work: Any, what: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(
            work, name=f"tidings rabbitmq {self.topic}/{self.group} {self.name} {what}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _consume(self, lane: _Lane) -> None:
        """Consume `lane`'s queue on a channel of its own (restored after a reconnect)."""
        broker = self.broker
        channel = broker._conn().channel(publisher_confirms=False)

        async def deliver(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            self._arrived(lane, channel, incoming)

        try:
            async with asyncio.timeout(broker.publish_timeout * 2):
                await channel.initialize(timeout=broker.publish_timeout)
                await channel.set_qos(prefetch_count=self.prefetch)
                queue = await broker._declare_queue(self.topic, self.group, lane.route, channel)
                if not self.stopped:
                    lane.channel = channel
                    lane.active = False
                    await queue.consume(deliver)
        except BaseException as exc:
            if lane.channel is channel:
                lane.channel = None
            await _close(channel)
            if _link_failure(exc, _FAILURES):
                raise RabbitMQBrokerError(f"cannot consume {lane.queue}: {_describe(exc)}") from exc
            raise
        if self.stopped:
            await _close(channel)

    def _arrived(
        self,
        lane: _Lane,
        channel: aio_pika.abc.AbstractChannel,
        incoming: aio_pika.abc.AbstractIncomingMessage,
    ) -> None:
        message = self.broker._decode(self.topic, incoming)
        message_id = message.id or incoming.message_id or ""
        if self.stopped or lane.channel is not channel:
            # Its channel is closing: RabbitMQ takes it back, and counts it.
            self.broker._returned_untaken(lane.queue, message_id)
            return
        attempt = self.broker._attempt(lane.queue, message_id, incoming)
        self.buffer.append(_Entry(lane, incoming, message, message_id, attempt))
        if not lane.active and lane is not self.any:
            lane.active = True
            self.check.set()
        self.changed.set()

    # -- handing out -------------------------------------------------------------------------

    def take(self) -> tuple[_AMQPReceived | None, float | None]:
        """The next message that may go out now, or when to look again (None: on a change)."""
        if self.held >= self.prefetch:
            return None, None
        now = time.monotonic()
        blocked = set(self.keys)
        soonest: float | None = None
        stale: list[_Entry] = []
        chosen: _Entry | None = None
        for entry in self.buffer:
            key = entry.message.key
            if entry.stale:
                stale.append(entry)
                continue
            if key is not None and key in blocked:
                continue
            if entry.lane.giving or entry.not_before > now:
                if not entry.lane.giving:
                    soonest = (
                        entry.not_before if soonest is None else min(soonest, entry.not_before)
                    )
                if key is not None:
                    blocked.add(key)  # later ones of its key wait
                continue
            chosen = entry
            break
        for entry in stale:
            self.buffer.remove(entry)
        if chosen is None:
            return None, soonest
        self.buffer.remove(chosen)
        chosen.taken = True
        self.held += 1
        chosen.lane.held += 1
        if chosen.message.key is not None:
            self.keys.add(chosen.message.key)
        return _AMQPReceived(self, chosen), None

    def release(self, entry: _Entry) -> None:
        lane = entry.lane
        self.held -= 1
        lane.held -= 1
        if entry.message.key is not None:
            self.keys.discard(entry.message.key)
        if lane.held <= 0:
            lane.settled.set()
        self.changed.set()

    def requeue(self, entry: _Entry, delay: float) -> None:
        """Back at the head of its key, to go out again after `delay` seconds."""
        self.release(entry)
        if self.stopped or entry.lane.channel is None:
            return  # its channel closed: RabbitMQ delivers it again
        entry.attempt += 1
        entry.not_before = time.monotonic() + delay if delay > 0 else 0.0
        self.buffer.insert(0, entry)
        self.changed.set()

    # -- sharing the shards ------------------------------------------------------------------

    async def _share(self) -> None:
        """Give away the shards this member is active on beyond its share."""
        broker = self.broker
        interval = broker.rebalance
        while not self.stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.check.wait()
            if self.check.is_set():
                self.check.clear()
                interval = 0.05  # others may still be joining: look again soon
            active = [
                lane
                for lane in self.shards
                if lane.active and not lane.giving and lane.channel is not None
            ]
            if len(active) <= 1:
                interval = broker.rebalance
                continue
            try:
                members = await self._members()
            except Exception as exc:
                if not _link_failure(exc, (RabbitMQBrokerError, *_FAILURES)):
                    raise
                log.debug("%s/%s: cannot count the members: %s", self.topic, self.group, exc)
                interval = broker.rebalance
                continue
            extra = len(active) - math.ceil(len(self.shards) / members)
            if extra <= 0:
                interval = min(interval * 2, broker.rebalance)
                continue

            def cost(lane: _Lane) -> tuple[int, int, int]:
                mine = [e for e in self.buffer if e.lane is lane]
                return (sum(1 for e in mine if e.not_before), lane.held, len(mine))

            for lane in sorted(active, key=cost)[:extra]:
                lane.giving = True
                self._spawn(self._give(lane), f"give {lane.route}")
            interval = 0.05

    async def _members(self) -> int:
        """The members of the group: the consumers of its `any` queue."""
        channel = self.any.channel
        if channel is None:
            return 1
        async with asyncio.timeout(self.broker.publish_timeout):
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(self.any.queue, passive=True)
        return max(1, declared.consumer_count or 1)

    async def _give(self, lane: _Lane) -> None:
        """Close the shard's channel once nothing of it is in this member's hands, so the next
        member in line gets it with what was buffered; then queue up for it again."""
        lane.giving = True
        self.changed.set()
        try:
            while lane.held > 0:
                lane.settled.clear()
                await lane.settled.wait()
            channel, lane.channel = lane.channel, None
            lane.active = False
            kept = []
            for entry in self.buffer:
                if entry.lane is not lane:
                    kept.append(entry)
                elif not entry.taken:
                    self.broker._returned_untaken(lane.queue, entry.id)
            self.buffer = kept
            await _close(channel)
        finally:
            lane.giving = False
        delay = 0.1
        while not self.stopped:
            try:
                await self._consume(lane)
                return
            except RabbitMQBrokerError as exc:
                log.warning("%s/%s: %s; trying again", self.topic, self.group, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


# -- helpers ------------------------------------------------------------------------------


def _name(*parts: str) -> str:
    """An AMQP name, `tidings:<parts>` (at most 255 bytes; `:` never occurs in topics and
    groups); a longer one is hashed, keeping the last part."""
    name = ":".join(("tidings", *parts))
    if len(name.encode()) <= _MAX_NAME:
        return name
    return f"tidings:{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}:{parts[-1]}"


async def _ignore(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def _close(channel: aio_pika.abc.AbstractChannel | None) -> None:
    """Close a channel, bounded; one of a dropped connection is closed already."""
    if channel is None or channel.is_closed:
        return
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await channel.close()
    except Exception as exc:
        if not _link_failure(exc, _GONE):
            raise
        log.debug("closing a channel failed: %s", _describe(exc))


def _link_failure(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` means the link to RabbitMQ failed: one of `kinds`, or the bare
    `Exception()` aiormq sets on every pending future when a connection closes without a
    reason (seen when a connection is cut mid-operation)."""
    return isinstance(exc, kinds) or type(exc) is Exception


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    return str(exc) or type(exc).__name__


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _text_headers(headers: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """AMQP headers as text. `cloudEvents:` names become `cloudEvents_`; a `time` that is
    an AMQP timestamp (or milliseconds, as the CloudEvents SDK sends it) becomes RFC 3339."""
    out: dict[str, str] = {}
    time_name = f"{prefix.lower()}time"
    for name, value in headers.items():
        if type(value) is str and name[11:12] != ":":  # nearly every header: as it is
            out[name] = value
            continue
        if name.lower().startswith("cloudevents:"):
            name = prefix + name[len("cloudevents:") :]
        if isinstance(value, datetime):
            aware = value if value.tzinfo else value.replace(tzinfo=UTC)
            out[name] = aware.isoformat()
        elif name.lower() == time_name and isinstance(value, int) and not isinstance(value, bool):
            try:
                out[name] = datetime.fromtimestamp(value / 1000, UTC).isoformat()
            except (OverflowError, ValueError, OSError):  # no time: decoding refuses it
                out[name] = str(value)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[name] = str(value)
        elif isinstance(value, bytes):
            out[name] = value.decode("utf-8", "replace")
    return out
