"""Shard ownership: a lease key per shard and group (`SET NX PX`, renewed by a heartbeat),
members in a sorted set each taking their fair share, taking a shard over from `XPENDING`,
handing it back, and claiming the keyless entries other members left."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tidings.brokers.envelope import Message
from tidings.brokers.redis.member import _POLL, _Consumer, _Entry
from tidings.brokers.redis.records import _ANY, _order

log = logging.getLogger(__name__)

# Heartbeat, renew this member's leases and (with acquire=1) take free shards up to the
# fair share. KEYS: members zset, the lease key of each shard. ARGV: member, ttl ms,
# acquire flag, first shard to try. Returns {fair share, shards owned...}.
_MAINTAIN = """
local members, me, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', members, now_ms + ttl, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now_ms)
redis.call('PEXPIRE', members, ttl * 2)
local n = #KEYS - 1
local fair = math.ceil(n / redis.call('ZCARD', members))
local owned = {}
for i = 0, n - 1 do
  local key = KEYS[2 + i]
  if redis.call('GET', key) == me then
    redis.call('PEXPIRE', key, ttl)
    owned[#owned + 1] = i
  end
end
if ARGV[3] == '1' then
  local start = tonumber(ARGV[4])
  for j = 0, n - 1 do
    if #owned >= fair then break end
    local i = (start + j) % n
    if redis.call('SET', KEYS[2 + i], me, 'NX', 'PX', ttl) then owned[#owned + 1] = i end
  end
end
table.insert(owned, 1, fair)
return owned
"""

# Compare-and-delete: release a lease only if this member holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Leases:
    """Shard ownership, mixed into `RedisBroker` (`self` is the broker)."""

    if TYPE_CHECKING:  # provided by `RedisBroker` and `_Members`
        shards: int
        lease: float
        _client: aioredis.Redis
        _closed: bool
        _maintain_script: Any
        _release_script: Any

        def _bounded(self) -> asyncio.Timeout: ...
        def _stream(self, topic: str, shard: int) -> str: ...
        def _lease(self, topic: str, shard: int, group: str) -> str: ...
        def _hold(self, topic: str, shard: int, group: str) -> str: ...
        def _members(self, topic: str, group: str) -> str: ...
        @staticmethod
        def _message(topic: str, fields: Mapping[bytes, bytes]) -> Message: ...
        async def _ack_foreign(self, c: _Consumer, foreign: list[tuple[str, bytes]]) -> None: ...

    # -- shard ownership -------------------------------------------------------------------

    async def _maintain(self, c: _Consumer, *, acquire: bool) -> None:
        keys = [self._members(c.topic, c.group)] + [
            self._lease(c.topic, n, c.group) for n in range(self.shards)
        ]
        start = zlib.crc32(c.member.encode()) % self.shards
        result = await self._maintain_script(
            keys=keys,
            args=[c.member, int(self.lease * 1000), "1" if acquire else "0", start],
        )
        if not acquire or c.left:
            return
        c.maintained = time.monotonic()
        c.fair = int(result[0])
        owned = {int(n) for n in result[1:]}
        for number in list(c.shards):
            if number != _ANY and number not in owned:  # the lease expired and went elsewhere
                c.handout.drop(number)
        surplus = len(owned) - c.fair
        for number in sorted(owned, reverse=True):
            if surplus <= 0:
                break
            if c.busy(number):
                continue
            await self._release(c, number)
            owned.discard(number)
            surplus -= 1
        for number in sorted(owned - set(c.shards)):
            await self._adopt(c, number)
        await self._autoclaim(c)

    async def _adopt(self, c: _Consumer, number: int) -> None:
        """Take a shard over: its pending entries come first, in stream order."""
        stream = self._stream(c.topic, number)
        shard: list[_Entry] = []
        held = c.held()
        pending: list[dict[str, Any]] = []
        cursor = "-"
        while True:
            page: Any = await self._client.xpending_range(stream, c.group, cursor, "+", 500)
            pending.extend(page)
            if len(page) < 500:
                break
            last = page[-1]["message_id"].decode()
            ms, seq = last.split("-")
            cursor = f"{ms}-{int(seq) + 1}"
        holds = await self._client.hgetall(self._hold(c.topic, number, c.group))
        if pending:
            async with self._client.pipeline(transaction=False) as pipe:
                for item in pending:
                    pipe.xrange(stream, item["message_id"], item["message_id"], count=1)
                ranges = await pipe.execute()
        else:
            ranges = []
        gone: list[tuple[str, bytes]] = []
        for item, found in zip(pending, ranges, strict=True):
            entry_id: bytes = item["message_id"]
            if entry_id in held:  # still in this member's hands (after a reconnect)
                shard.append(held[entry_id])
                continue
            if not found or found[0][1].get(b"g", c.group.encode()) != c.group.encode():
                gone.append((stream, entry_id))
                continue
            entry = _Entry(
                entry_id,
                number,
                self._message(c.topic, found[0][1]),
                int(item["times_delivered"]),
                counted=False,
            )
            if entry_id in holds:
                entry.not_before = float(holds[entry_id])
            shard.append(entry)
        await self._ack_foreign(c, gone)
        c.shards[number] = shard
        c.handout.wake()

    async def _release(self, c: _Consumer, number: int) -> None:
        """Hand a shard back: entries read ahead go back undelivered, then the lease."""
        entries = c.handout.drop(number)
        await self._give_back(c, self._stream(c.topic, number), entries, idle=False)
        await self._release_script(keys=[self._lease(c.topic, number, c.group)], args=[c.member])

    async def _give_back(
        self, c: _Consumer, stream: str, entries: list[_Entry], *, idle: bool
    ) -> None:
        """Return pending entries to the group uncounted if never handed out; with `idle`,
        old enough for any member's `XAUTOCLAIM` (at once, or when a nack's delay ends)."""
        if not entries:
            return
        lease_ms = int(self.lease * 1000)
        now = time.time()
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                options: dict[str, Any] = {}
                if entry.counted:
                    options["retrycount"] = max(0, entry.count - 1)
                if idle:
                    wait_ms = int(max(0.0, entry.not_before - now) * 1000)
                    # claimable by XAUTOCLAIM (min idle = the lease) now, or once its delay ends
                    options["idle"] = max(0, lease_ms - wait_ms) if wait_ms else lease_ms * 100
                pipe.xclaim(stream, c.group, c.member, 0, [entry.id], justid=True, **options)
            await pipe.execute()

    async def _autoclaim(self, c: _Consumer) -> None:
        """Take over keyless entries other members left (or died with) a lease ago."""
        want = c.handout.room
        if want <= 0 or time.monotonic() - c.claimed < _POLL:
            return
        c.claimed = time.monotonic()
        stream = self._stream(c.topic, _ANY)
        reply = await self._client.xautoclaim(
            stream, c.group, c.member, int(self.lease * 1000), "0-0", count=want
        )
        items = [(i, f) for i, f in reply[1] if f is not None]
        if not items:
            return
        pending = await self._client.xpending_range(
            stream, c.group, items[0][0], items[-1][0], len(items) + 16, consumername=c.member
        )
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        lane = c.handout.lane(_ANY)
        held = c.held()
        foreign: list[tuple[str, bytes]] = []
        for entry_id, fields in items:
            if fields.get(b"g", c.group.encode()) != c.group.encode():
                foreign.append((stream, entry_id))
            elif entry_id not in held and entry_id in counts:
                message = self._message(c.topic, fields)
                lane.append(_Entry(entry_id, _ANY, message, counts[entry_id], counted=True))
        lane.sort(key=lambda e: _order(e.id))
        await self._ack_foreign(c, foreign)

    def _forget_shards(self, c: _Consumer) -> None:
        c.shards.clear()
        c.handout.lane(_ANY)
        c.maintained = -math.inf

    async def _heartbeat(self, c: _Consumer) -> None:
        """Keep the member registered and its leases alive while it is busy elsewhere."""
        while not (c.left or self._closed):
            await asyncio.sleep(self.lease / 3)
            try:
                async with self._bounded():
                    await self._maintain(c, acquire=False)
            except (RedisError, OSError) as exc:
                log.debug("redis broker: heartbeat failed: %s", exc)
