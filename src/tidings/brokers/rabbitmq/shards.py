"""Sharing the shard queues of a group out among its members: a member active on more than
its share gives the extra shards away, each once nothing of it is in the member's hands."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc

from tidings.brokers.handout import HandOut
from tidings.brokers.rabbitmq.errors import _FAILURES, RabbitMQBrokerError, _close, _link_failure

if TYPE_CHECKING:
    from tidings.brokers.rabbitmq.broker import RabbitMQBroker
    from tidings.brokers.rabbitmq.member import _Entry

log = logging.getLogger("tidings.brokers.rabbitmq")


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


class _Sharing:
    """A member's share of the shards (a part of `_Member`)."""

    broker: RabbitMQBroker
    topic: str
    group: str
    shards: list[_Lane]
    any: _Lane
    handout: HandOut[str, _Entry]
    check: asyncio.Event
    changed: asyncio.Event
    stopped: bool

    if TYPE_CHECKING:

        def _spawn(self, work: Any, what: str) -> None: ...

        async def _consume(self, lane: _Lane) -> None: ...

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
                mine = self.handout.lanes.get(lane.route, [])
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
            for entry in self.handout.drop(lane.route):
                if not entry.taken:
                    self.broker._returned_untaken(lane.queue, entry.id)
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
