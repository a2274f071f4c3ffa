"""Naming and declaring: the topic exchanges, the shard queues of a group and where a key
goes, and the dead-letter exchange and queues."""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

log = logging.getLogger("tidings.brokers.rabbitmq")

DLX = "tidings.dlx"  # the dead-letter exchange (fanout)
DLQ = "tidings.dlq"  # where dead letters are kept
DLQ_LOCK = "tidings.dlq.lock"  # its exclusive consumer is the lock for listing them
_ANY = "any"  # the routing key and queue suffix of keyless messages
_MAX_NAME = 255
_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


class _Topology:
    """The broker's naming and declaring (a part of `RabbitMQBroker`)."""

    shards: int
    queue_type: str
    expires: float
    _topics: set[str]
    _groups: dict[tuple[str, str], float]
    _foreign: set[str]

    if TYPE_CHECKING:

        async def _admin_channel(self) -> aio_pika.abc.AbstractChannel: ...

        async def _reset_admin(self) -> None: ...

        async def _admin_call(self, action: Any, what: str) -> Any: ...

    async def _declare_dead_letters(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT, durable=True)
        dlq = await channel.declare_queue(DLQ, durable=True, arguments=_QUORUM)
        await dlq.bind(DLX, routing_key="")
        await channel.declare_queue(DLQ_LOCK, durable=True)

    def _route(self, key: str | None) -> str:
        return _ANY if key is None else str(zlib.crc32(key.encode()) % self.shards)

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


def _name(*parts: str) -> str:
    """An AMQP name, `tidings:<parts>` (at most 255 bytes; `:` never occurs in topics and
    groups); a longer one is hashed, keeping the last part."""
    name = ":".join(("tidings", *parts))
    if len(name.encode()) <= _MAX_NAME:
        return name
    return f"tidings:{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}:{parts[-1]}"
