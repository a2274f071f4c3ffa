"""One member of a group: consuming every queue of the group, handing out in key order,
acking and nacking through its hand-out (one lane per queue)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import HandOut, next_in_key_order
from tidings.brokers.rabbitmq.errors import (
    RabbitMQBrokerError,
    _close,
    _describe,
    _failed,
    _gone,
)
from tidings.brokers.rabbitmq.shards import _Lane, _Sharing
from tidings.brokers.rabbitmq.topology import _ANY

if TYPE_CHECKING:
    from tidings.brokers.rabbitmq.broker import RabbitMQBroker

log = logging.getLogger("tidings.brokers.rabbitmq")


@dataclass(eq=False)
class _Entry:
    lane: _Lane
    incoming: aio_pika.abc.AbstractIncomingMessage
    message: Message
    id: str
    attempt: int
    taken: bool = False  # handed out at least once
    not_before: float = 0.0  # monotonic; after a nack with a delay

    @property
    def stale(self) -> bool:
        """Its channel is gone (a reconnect): RabbitMQ delivers it again."""
        try:
            return bool(self.incoming.channel.is_closed)
        except aiormq.exceptions.ChannelInvalidStateError:
            return True


class _AMQPReceived(Received):
    def __init__(self, member: _Member, entry: _Entry) -> None:
        super().__init__(entry.message, entry.attempt)
        self.member, self.entry = member, entry

    async def ack(self) -> None:
        try:  # before releasing it: that may let a give-away close the channel
            await self.entry.incoming.ack()
        except Exception as exc:
            if not _gone(exc):
                raise
            log.warning(
                "%s/%s: message %s was not acked (%s); it comes again",
                self.member.topic,
                self.member.group,
                self.entry.id,
                _describe(exc),
            )
        finally:
            self.member.settle(self.entry)

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
        self.handout: HandOut[str, _Entry] = HandOut(prefetch)  # a lane per queue (route)
        self.changed = self.handout.changed
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
        for route in list(self.handout.lanes):
            for entry in self.handout.drop(route):
                if not entry.taken:
                    self.broker._returned_untaken(entry.lane.queue, entry.id)
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
            if _failed(exc):
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
        self.handout.add(lane.route, _Entry(lane, incoming, message, message_id, attempt))
        if not lane.active and lane is not self.any:
            lane.active = True
            self.check.set()

    # -- handing out -------------------------------------------------------------------------

    def take(self) -> tuple[_AMQPReceived | None, float | None]:
        """The next message that may go out now, or when to look again (None: on a change)."""
        out = self.handout
        if out.room <= 0:
            return None, None
        now = time.monotonic()
        soonest: float | None = None
        for route, entry, when in out.candidates(now):
            while entry is not None and entry.stale:  # its channel is gone: it comes again
                out.lanes[route].remove(entry)
                entry, when = next_in_key_order(out.lanes[route], out.holding, now)
            if entry is not None and entry.lane.giving:
                continue  # being given away: nothing more goes out of it
            if entry is not None:
                entry.taken = True
                entry.lane.held += 1
                return _AMQPReceived(self, out.take(entry)), None
            if when is not None:
                soonest = when if soonest is None else min(soonest, when)
        return None, soonest

    def _let_go(self, entry: _Entry) -> None:
        lane = entry.lane
        if self.handout.release(entry):
            lane.held -= 1
        if lane.held <= 0:
            lane.settled.set()

    def settle(self, entry: _Entry) -> None:
        """Acked (or given up on): out of the member's hands and its buffer."""
        self._let_go(entry)
        self.handout.finish(entry.lane.route, entry)

    def requeue(self, entry: _Entry, delay: float) -> None:
        """Back at the head of its key, to go out again after `delay` seconds."""
        if self.stopped or entry.lane.channel is None:
            self.settle(entry)  # its channel closed: RabbitMQ delivers it again
            return
        entry.attempt += 1
        self._let_go(entry)
        self.handout.retry(entry, delay if delay > 0 else None)
