"""One member of a group: the shards it owns and their pending entries, receiving,
handing out in key order within `prefetch`, settling (ack, nack), and leaving."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import HandOut
from tidings.brokers.redis.errors import _DOWN, RedisBrokerError
from tidings.brokers.redis.records import _ANY, _message

log = logging.getLogger(__name__)

_BUFFER = 64  # entries a member reads ahead per shard
_POLL = 0.1  # longest block of one read, seconds: how soon acks and newcomers are seen
_LOOK, _SETTLED_LOOK = 0.01, 0.05  # seconds between looks at the shares: moving, settled


@dataclass(eq=False)
class _Entry:
    id: bytes
    shard: int
    message: Message
    count: int  # deliveries Redis counts
    counted: bool  # Redis already counts its next hand-out (read or auto-claimed)
    not_before: float = 0.0  # wall clock: holds are kept in Redis for every member


@dataclass(eq=False)
class _Consumer:
    """One member: its shards (lanes of its hand-out) and the entries read from them."""

    topic: str
    group: str
    member: str
    prefetch: int
    handout: HandOut[int, _Entry] = field(init=False)
    left: bool = False
    maintained: float = -math.inf
    claimed: float = -math.inf
    fair: int = 0
    heartbeat: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.handout = HandOut(self.prefetch, clock=time.time)

    @property
    def shards(self) -> dict[int, list[_Entry]]:
        """Shard number -> its entries read ahead, in stream order (`_ANY`: keyless)."""
        return self.handout.lanes

    def held(self) -> dict[bytes, _Entry]:
        """The entries in this member's hands, by id."""
        return {entry.id: entry for entry in self.handout.holding}

    def busy(self, number: int) -> bool:
        return any(self.handout.held(entry) for entry in self.shards.get(number, ()))

    def forget(self, entry: _Entry) -> None:
        self.handout.finish(entry.shard, entry)


class _Received(Received):
    def __init__(self, broker: _Members, consumer: _Consumer, entry: _Entry) -> None:
        super().__init__(entry.message, entry.count)
        self.broker, self.consumer, self.entry = broker, consumer, entry

    async def ack(self) -> None:
        c, entry = self.consumer, self.entry
        b = self.broker
        try:
            async with b._bounded():
                if not entry.not_before:  # the common case: one command, no pipeline
                    await b._client.xack(b._stream(c.topic, entry.shard), c.group, entry.id)
                    return
                async with b._client.pipeline(transaction=False) as pipe:
                    pipe.xack(b._stream(c.topic, entry.shard), c.group, entry.id)
                    pipe.hdel(b._hold(c.topic, entry.shard, c.group), entry.id)
                    await pipe.execute()
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(f"cannot ack {self.message.id} on Redis: {exc}") from exc
        finally:
            c.forget(entry)

    async def nack(self, delay: float | None) -> None:
        c, entry = self.consumer, self.entry
        b = self.broker
        c.handout.retry(entry, delay)
        if delay:
            try:
                async with b._bounded():
                    hold = b._hold(c.topic, entry.shard, c.group)
                    await b._client.hset(hold, entry.id, str(entry.not_before))
            except (RedisError, TimeoutError) as exc:
                raise RedisBrokerError(f"cannot nack {self.message.id} on Redis: {exc}") from exc


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
        def _join(self, member: str, leave: Callable[[], Awaitable[None]]) -> None: ...
        def _bounded(self) -> asyncio.Timeout: ...

    _message = staticmethod(_message)

    # -- consuming -------------------------------------------------------------------------

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        c = _Consumer(topic, group, member, max(1, prefetch))
        c.handout.lane(_ANY)
        self._consumers[(topic, group, member)] = c
        self._join(member, lambda: self._leave_consumer(c))
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
        # Shares move while members come and go: look often until this one holds its fair
        # share, then less (each look is a round trip).
        settled = len(c.shards) - 1 == c.fair
        if time.monotonic() - c.maintained >= (_SETTLED_LOOK if settled else _LOOK):
            async with self._bounded():  # TimeoutError is an OSError: in _DOWN
                await self._maintain(c, acquire=True)
        out = c.handout
        if out.room <= 0:
            await out.wait(_POLL)
            return None
        entry, soonest = out.next()
        if entry is not None:
            return await self._hand_out(c, entry)
        timeout = _POLL if soonest is None else max(0.001, min(_POLL, soonest - time.time()))
        if len(c.shards) < c.fair:
            timeout = min(timeout, 0.02)  # shards may come free any moment
        room = [n for n, lane in sorted(out.lanes.items()) if len(lane) < _BUFFER or n == _ANY]
        if room:
            async with self._bounded():
                await self._read(c, room, out.room, timeout)
        else:
            await out.wait(timeout)
        return None

    async def _read(self, c: _Consumer, shards: list[int], count: int, timeout: float) -> None:
        streams: dict[Any, Any] = {self._stream(c.topic, n): ">" for n in shards}
        response: Any = await self._client.xreadgroup(
            c.group, c.member, streams, count=count, block=max(1, int(timeout * 1000))
        )
        by_name = {self._stream(c.topic, n).encode(): n for n in shards}
        foreign: list[tuple[str, bytes]] = []
        for stream, items in response or []:
            number = by_name[stream]
            lane = c.shards.get(number)
            for entry_id, fields in items:
                if fields.get(b"g", c.group.encode()) != c.group.encode():
                    foreign.append((self._stream(c.topic, number), entry_id))
                elif lane is not None:
                    lane.append(
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
            async with self._bounded():
                return await self._claim(c, entry)
        return _Received(self, c, c.handout.take(entry))

    async def _claim(self, c: _Consumer, entry: _Entry) -> _Received | None:
        """Hand out an entry Redis does not count yet: claimed, so its count goes up."""
        stream = self._stream(c.topic, entry.shard)
        claimed = await self._client.xclaim(stream, c.group, c.member, 0, [entry.id])
        if not claimed:  # deleted from the stream meanwhile: nothing to deliver
            await self._client.xack(stream, c.group, entry.id)
            c.forget(entry)
            return None
        entry.count += 1
        return _Received(self, c, c.handout.take(entry))

    async def _leave_consumer(self, c: _Consumer) -> None:
        if c.left:
            return
        c.left = True
        c.handout.wake()
        self._consumers.pop((c.topic, c.group, c.member), None)
        if c.heartbeat is not None:
            c.heartbeat.cancel()
            await asyncio.gather(c.heartbeat, return_exceptions=True)
        try:
            for number in list(c.shards):
                if number != _ANY:
                    await self._release(c, number)
            anyway = c.handout.drop(_ANY)
            anyway += [e for e in c.handout.holding if e not in anyway and e.shard == _ANY]
            await self._give_back(c, self._stream(c.topic, _ANY), anyway, idle=True)
            await self._client.zrem(self._members(c.topic, c.group), c.member)
        except RedisError as exc:  # the leases expire by themselves
            log.warning("redis broker: %s/%s could not leave cleanly: %s", c.topic, c.group, exc)
