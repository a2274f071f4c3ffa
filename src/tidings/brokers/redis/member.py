"""One member of a group: the shards it owns and their pending entries, receiving,
handing out in key order within `prefetch`, settling (ack, nack), and leaving."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import next_in_key_order, wait_set
from tidings.brokers.redis.errors import _DOWN, RedisBrokerError
from tidings.brokers.redis.records import _ANY, _message

log = logging.getLogger(__name__)

_BUFFER = 64  # entries a member reads ahead per shard
_POLL = 0.1  # longest block of one read, seconds: how soon acks and newcomers are seen


@dataclass(eq=False)
class _Entry:
    id: bytes
    shard: int
    message: Message
    count: int  # deliveries Redis counts
    counted: bool  # Redis already counts its next hand-out (read or auto-claimed)
    holder: bool = False
    not_before: float = 0.0  # wall clock


@dataclass(eq=False)
class _Shard:
    number: int
    entries: list[_Entry] = field(default_factory=list)

    def next(self, now: float) -> tuple[_Entry | None, float | None]:
        """The first entry that may go out now, and when to look again if none."""
        return next_in_key_order(self.entries, now)

    @property
    def busy(self) -> bool:
        return any(entry.holder for entry in self.entries)


@dataclass(eq=False)
class _Consumer:
    topic: str
    group: str
    member: str
    prefetch: int
    shards: dict[int, _Shard] = field(default_factory=dict)
    inflight: dict[bytes, _Entry] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    left: bool = False
    maintained: float = -math.inf
    claimed: float = -math.inf
    fair: int = 0
    turn: int = 0
    heartbeat: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self.changed.set()

    def next(self, now: float) -> tuple[_Entry | None, float | None]:
        soonest: float | None = None
        order = sorted(self.shards)
        if order:
            self.turn = (self.turn + 1) % len(order)
            order = order[self.turn :] + order[: self.turn]
        for number in order:
            entry, when = self.shards[number].next(now)
            if entry is not None:
                return entry, None
            if when is not None:
                soonest = when if soonest is None else min(soonest, when)
        return None, soonest


class _Received(Received):
    def __init__(self, broker: _Members, consumer: _Consumer, entry: _Entry) -> None:
        self.broker = broker
        self.consumer = consumer
        self.entry = entry
        self.message = entry.message
        self.attempt = entry.count

    async def ack(self) -> None:
        c, entry = self.consumer, self.entry
        b = self.broker
        try:
            if not entry.not_before:  # the common case: one command, no pipeline
                await b._client.xack(b._stream(c.topic, entry.shard), c.group, entry.id)
                return
            async with b._client.pipeline(transaction=False) as pipe:
                pipe.xack(b._stream(c.topic, entry.shard), c.group, entry.id)
                pipe.hdel(b._hold(c.topic, entry.shard, c.group), entry.id)
                await pipe.execute()
        except RedisError as exc:
            raise RedisBrokerError(f"cannot ack {self.message.id} on Redis: {exc}") from exc
        finally:
            self._forget()

    async def nack(self, delay: float | None) -> None:
        c, entry = self.consumer, self.entry
        b = self.broker
        entry.holder = False
        c.inflight.pop(entry.id, None)
        entry.not_before = time.time() + (delay or 0.0)
        c.wake()
        if delay:
            try:
                await b._client.hset(
                    b._hold(c.topic, entry.shard, c.group),
                    entry.id,
                    str(entry.not_before),
                )
            except RedisError as exc:
                raise RedisBrokerError(f"cannot nack {self.message.id} on Redis: {exc}") from exc

    def _forget(self) -> None:
        c, entry = self.consumer, self.entry
        c.inflight.pop(entry.id, None)
        shard = c.shards.get(entry.shard)
        if shard is not None and entry in shard.entries:
            shard.entries.remove(entry)
        c.wake()


class _Members:
    """Receiving and leaving, mixed into `RedisBroker` (`self` is the broker)."""

    if TYPE_CHECKING:  # provided by `RedisBroker` and `_Leases`
        _client: aioredis.Redis
        _consumers: dict[tuple[str, str, str], _Consumer]
        _closed: bool

        def _stream(self, topic: str, shard: int) -> str: ...
        def _hold(self, topic: str, shard: int, group: str) -> str: ...
        def _members(self, topic: str, group: str) -> str: ...
        async def _maintain(self, c: _Consumer, *, acquire: bool) -> None: ...
        async def _release(self, c: _Consumer, number: int) -> None: ...
        async def _give_back(
            self, c: _Consumer, stream: str, entries: list[_Entry], *, idle: bool
        ) -> None: ...
        def _forget_shards(self, c: _Consumer) -> None: ...
        async def _heartbeat(self, c: _Consumer) -> None: ...

    _message = staticmethod(_message)

    # -- consuming -------------------------------------------------------------------------

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        c = _Consumer(topic, group, member, max(1, prefetch))
        c.shards[_ANY] = _Shard(_ANY)
        self._consumers[(topic, group, member)] = c
        c.heartbeat = asyncio.create_task(self._heartbeat(c))
        backoff = 0.05
        try:
            while not (c.left or self._closed):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError  # one swallowed by a timeout race
                try:
                    received = await self._next(c)
                    backoff = 0.05
                except _DOWN as exc:
                    if c.left or self._closed:
                        return
                    log.warning("redis broker: %s/%s lost Redis (%s); retrying", topic, group, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    self._forget_shards(c)  # rebuilt from the group's state on reconnect
                    continue
                if received is not None:
                    yield received
        finally:
            if c.heartbeat is not None:
                c.heartbeat.cancel()

    async def _next(self, c: _Consumer) -> _Received | None:
        """One delivery, or None after waiting a little (the caller loops)."""
        if time.monotonic() - c.maintained >= 0.01:
            await self._maintain(c, acquire=True)
        if len(c.inflight) >= c.prefetch:
            await self._wait(c, _POLL)
            return None
        entry, soonest = c.next(time.time())
        if entry is not None:
            return await self._hand_out(c, entry)
        timeout = _POLL if soonest is None else max(0.001, min(_POLL, soonest - time.time()))
        if len(c.shards) < c.fair:
            timeout = min(timeout, 0.02)  # shards may come free any moment
        room = [n for n, s in sorted(c.shards.items()) if len(s.entries) < _BUFFER or n == _ANY]
        if room:
            await self._read(c, room, c.prefetch - len(c.inflight), timeout)
        else:
            await self._wait(c, timeout)
        return None

    async def _wait(self, c: _Consumer, timeout: float) -> None:
        c.changed.clear()
        await wait_set(c.changed, timeout)

    async def _read(self, c: _Consumer, shards: list[int], count: int, timeout: float) -> None:
        streams: dict[Any, Any] = {self._stream(c.topic, n): ">" for n in shards}
        response: Any = await self._client.xreadgroup(
            c.group, c.member, streams, count=count, block=max(1, int(timeout * 1000))
        )
        by_name = {self._stream(c.topic, n).encode(): n for n in shards}
        foreign: list[tuple[str, bytes]] = []
        for stream, items in response or []:
            number = by_name[stream]
            shard = c.shards.get(number)
            for entry_id, fields in items:
                if fields.get(b"g", c.group.encode()) != c.group.encode():
                    foreign.append((self._stream(c.topic, number), entry_id))
                elif shard is not None:
                    shard.entries.append(
                        _Entry(entry_id, number, self._message(c.topic, fields), 1, counted=True)
                    )
        await self._ack_foreign(c, foreign)

    async def _ack_foreign(self, c: _Consumer, foreign: list[tuple[str, bytes]]) -> None:
        """Ack entries replayed for another group: not this group's business."""
        if foreign:
            async with self._client.pipeline(transaction=False) as pipe:
                for stream, entry_id in foreign:
                    pipe.xack(stream, c.group, entry_id)
                await pipe.execute()

    async def _hand_out(self, c: _Consumer, entry: _Entry) -> _Received | None:
        if entry.counted:
            entry.counted = False
        else:
            claimed = await self._client.xclaim(
                self._stream(c.topic, entry.shard), c.group, c.member, 0, [entry.id]
            )
            if not claimed:  # deleted from the stream meanwhile: nothing to deliver
                await self._client.xack(self._stream(c.topic, entry.shard), c.group, entry.id)
                shard = c.shards.get(entry.shard)
                if shard is not None and entry in shard.entries:
                    shard.entries.remove(entry)
                return None
            entry.count += 1
        entry.holder = True
        c.inflight[entry.id] = entry
        return _Received(self, c, entry)

    async def _leave(self, topic: str, group: str, member: str) -> None:
        consumer = self._consumers.get((topic, group, member))
        if consumer is not None:
            await self._leave_consumer(consumer)

    async def _leave_consumer(self, c: _Consumer) -> None:
        if c.left:
            return
        c.left = True
        c.wake()
        self._consumers.pop((c.topic, c.group, c.member), None)
        if c.heartbeat is not None:
            c.heartbeat.cancel()
            await asyncio.gather(c.heartbeat, return_exceptions=True)
        try:
            for number in list(c.shards):
                if number != _ANY:
                    await self._release(c, number)
            anyway = c.shards.pop(_ANY, _Shard(_ANY)).entries
            anyway += [e for e in c.inflight.values() if e not in anyway and e.shard == _ANY]
            await self._give_back(c, self._stream(c.topic, _ANY), anyway, idle=True)
            await self._client.zrem(self._members(c.topic, c.group), c.member)
        except RedisError as exc:  # the leases expire by themselves
            log.warning("redis broker: %s/%s could not leave cleanly: %s", c.topic, c.group, exc)
