"""One member of a group: consuming every queue of the group, handing out in key order,
acking and nacking (the buffer, the held keys)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.rabbitmq.errors import (
    _FAILURES,
    _GONE,
    RabbitMQBrokerError,
    _close,
    _describe,
    _link_failure,
)
from tidings.brokers.rabbitmq.shards import _Lane, _Sharing
from tidings.brokers.rabbitmq.topology import _ANY

if TYPE_CHECKING:
    from tidings.brokers.rabbitmq.broker import RabbitMQBroker

log = logging.getLogger("tidings.brokers.rabbitmq")


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


class _Member(_Sharing):
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
