"""`RabbitMQBroker`: the URL and options, connecting, the admin channel, publishing with
publisher confirms, members joining and leaving, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tidings.brokers.base import BrokerBase, url_settings
from tidings.brokers.dead_letters import DeadLetter
from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.rabbitmq.errors import (
    _CLOSE_TIMEOUT,
    _GONE,
    RabbitMQBrokerError,
    _close,
    _describe,
    _failed,
)
from tidings.brokers.rabbitmq.member import _Member
from tidings.brokers.rabbitmq.records import (
    dead_letter_record,
    from_amqp,
    from_dead_letter_record,
    to_amqp,
)
from tidings.brokers.rabbitmq.topology import _QUORUM, DLQ, DLQ_LOCK, DLX, _name, _Topology
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError

log = logging.getLogger("tidings.brokers.rabbitmq")


class RabbitMQBroker(_Topology, BrokerBase):
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
        self._exchanges: tuple[object, dict[str, aio_pika.abc.AbstractExchange]] = (None, {})
        self._admin_lock = asyncio.Lock()
        self._dlq_lock = asyncio.Lock()
        self._topics: set[str] = set()  # exchanges declared by this broker
        self._groups: dict[tuple[str, str], float] = {}  # declared, when (monotonic)
        self._foreign: set[str] = set()  # queues that exist with other arguments
        self._returned: dict[tuple[str, str], int] = {}  # (queue, id) -> returned untaken

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQBroker:
        wrong = "a RabbitMQ URL starts with amqp://"
        return cls(url, **url_settings(cls, url, ("amqp", "amqps"), wrong, options))

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

    async def _close(self) -> None:
        await self._leave_all()
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

    def _exchanges_of(
        self, channel: aio_pika.abc.AbstractChannel
    ) -> dict[str, aio_pika.abc.AbstractExchange]:
        """The exchanges already looked up on `channel` (a new channel starts afresh)."""
        if self._exchanges[0] is not channel:
            self._exchanges = (channel, {})
        return self._exchanges[1]

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
            if not _failed(exc):
                raise
            await self._reset_admin()
            raise RabbitMQBrokerError(f"cannot {what} on RabbitMQ: {_describe(exc)}") from exc

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        exchange = _name(topic)
        await self._send([(exchange, self._route(m.key), self._amqp(m)) for m in messages], topic)

    def _amqp(self, message: Message) -> aio_pika.Message:
        return to_amqp(message, self.header_prefix)

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
                    exchanges = self._exchanges_of(channel)
                    for name, _, _ in sends:
                        if name not in exchanges:
                            exchanges[name] = (
                                channel.default_exchange
                                if name == ""
                                else await channel.get_exchange(name, ensure=False)
                            )
                    if len(sends) == 1:  # the common case: no gather, which runs a task each
                        name, key, m = sends[0]
                        results: list[Any] = [await _outcome(exchanges[name].publish(m, key))]
                    else:
                        results = await asyncio.gather(
                            *(exchanges[name].publish(m, key) for name, key, m in sends),
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
                if not _failed(exc):
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

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        consumer = _Member(self, topic, group, member, max(1, prefetch))
        self._join(member, consumer.stop)
        await consumer.start()
        while not (consumer.stopped or self._closed):
            received, soonest = consumer.take()
            if received is not None:
                yield received
                continue
            timeout = 1.0 if soonest is None else min(1.0, max(0.001, soonest - time.monotonic()))
            await consumer.handout.wait(timeout)

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
        return from_amqp(topic, incoming, self.header_prefix)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        self._groups.pop((dead.topic, dead.group), None)  # make sure its queues exist
        await self._declare(dead.topic, dead.group)
        queue = self._queue(dead.topic, dead.group, self._route(dead.message.key))
        await self._send([("", queue, self._amqp(dead.message))])

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        amqp = dead_letter_record(dead, self.dead_letter_max_age)
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
                if not _failed(exc):
                    raise
                raise RabbitMQBrokerError(
                    f"cannot read the dead letters: {_describe(exc)}"
                ) from exc

    async def _read_dead_letters(self, drop: str | None) -> list[DeadLetter]:
        channel = await self._plain_channel()
        found: list[DeadLetter] = []
        returned = 0  # taken and not acked: they go back when the channel closes
        try:
            queue = await channel.declare_queue(DLQ, durable=True, arguments=_QUORUM)
            result = queue.declaration_result
            count = result.message_count if result and result.message_count else 0
            for _ in range(count):
                incoming = await queue.get(no_ack=False, fail=False, timeout=5)
                if incoming is None:
                    break
                try:
                    dead = self._dead_letter(incoming)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("skipping an unreadable dead letter: %s", exc)
                    returned += 1
                    continue
                if dead.id == drop:
                    await incoming.ack()
                else:
                    found.append(dead)
                    returned += 1
        finally:
            await _close(channel)  # everything taken and not acked goes back
        await self._until_returned(returned)
        found.sort(key=lambda dead: dead.failed_at)  # stable: queue order on ties
        return found

    async def _until_returned(self, returned: int) -> None:
        """Wait (under the lock, briefly) until what a browse gave back is ready in the queue
        again: the server requeues a closed channel's messages after the close, and a browse
        or a replay right after would count, and so miss, only those already back."""
        deadline = time.monotonic() + 5
        channel = await self._plain_channel()
        try:
            while True:
                queue = await channel.declare_queue(DLQ, durable=True, arguments=_QUORUM)
                result = queue.declaration_result
                if (result.message_count or 0) >= returned or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.01)
        finally:
            await _close(channel)

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
        return from_dead_letter_record(incoming, self.header_prefix)


async def _ignore(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def _outcome(publishing: Awaitable[Any]) -> Any:
    """The confirmation, or the failure as a value (what `gather(return_exceptions=True)`
    gives for one)."""
    try:
        return await publishing
    except Exception as exc:
        return exc
