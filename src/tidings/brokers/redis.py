"""`RedisBroker`: Redis Streams and consumer groups (`redis://host:port/db?shards=8`).

A topic is `shards` streams, `tidings:{topic}:{n}`, for keyed messages (the shard is a
stable CRC-32 of the key), plus `tidings:{topic}:any` for messages without a key.
Messages are CloudEvents in structured mode (a stream entry has no headers): field `ce`
holds the JSON document, `k` the key. A group is a Redis consumer group on every one of
these streams, created at `$` when declared, so it gets everything published after that.

Keyless messages need no order between members, so all members of a group read `any`
competitively with plain `XREADGROUP` (no more at a time than their prefetch). What a
member leaves pending there is given back on leaving with `XCLAIM ... IDLE` set past the
lease, and any member's periodic `XAUTOCLAIM` (min idle = the lease) takes it at once; what
a dead member left is taken the same way once it has been idle a lease long.

Each shard of a group is owned by one member at a time through a lease key
(`SET NX PX`, renewed by a heartbeat task). Members register in a sorted set with an
expiry and each takes at most its fair share, `ceil(shards / live members)`, handing
surplus shards back when others join; a member that leaves releases its shards at once,
one that dies loses them when its lease expires. The owner keeps the shard's pending
entries in stream order, like `MemoryBroker` keeps a group's queue: it hands out an entry
when no earlier entry of the same key is in flight or waiting, so keys keep their order
and different keys of one shard still flow in parallel. On taking a shard over, the new
owner adopts the group's pending entries of that shard from `XPENDING` (what the previous
owner took but did not ack) before reading new ones with `XREADGROUP`.

`attempt` is the entry's delivery count: `XREADGROUP` makes it 1, each redelivery is an
`XCLAIM` that adds one. Entries read ahead but never handed out are given back with
`XCLAIM ... RETRYCOUNT` (one less) when released, so they still arrive as attempt 1.
`nack(delay)` leaves the entry pending and records when it may go again, in the owner's
memory and in the hash `tidings:{topic}:{n}:hold:{group}` (a new owner honours it). Ack is
`XACK`. Consumers reconnect by themselves after a connection drop and rebuild their state
from the group's (pending entries and leases), since Redis holds all of it. A connection
that stalls without a reset is dropped when a reply is 30 s late (`?socket_timeout=`); other
query parameters of the URL go to redis-py as they are.

Dead letters are JSON documents in the hash `tidings:dlq`, by id. Replaying one appends
the message to its shard again with a field `g` naming the group: members of other groups
ack such entries unseen, so only that group retries it.

All clients of a topic must agree on `shards`. Entries are never trimmed from the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.brokers.base import BrokerBase, DeadLetter, Received, next_in_key_order
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError

__all__ = ["RedisBroker", "RedisBrokerError"]

log = logging.getLogger(__name__)

_ANY = -1  # the stream of keyless messages, which all members of a group share
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_BUFFER = 64  # entries a member reads ahead per shard
_SOCKET_TIMEOUT = 30.0  # seconds a reply may take (`?socket_timeout=` sets it)
_POLL = 0.1  # longest block of one read, seconds: how soon acks and newcomers are seen

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


class RedisBrokerError(BrokerError):
    """Redis failed (unreachable after retries, or refused a command)."""


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
    def __init__(self, broker: RedisBroker, consumer: _Consumer, entry: _Entry) -> None:
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


class RedisBroker(BrokerBase):
    """A broker on Redis Streams; see the module docstring for the design."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        shards: int = 8,
        lease: float = 5.0,
        prefix: str = "tidings",
        codec: JSONCodec | None = None,
        source: str = "tidings",
        **client_options: Any,
    ) -> None:
        super().__init__(codec=codec, source=source)
        if not isinstance(shards, int) or not 1 <= shards <= 1024:
            raise ConfigurationError(f"shards must be an int from 1 to 1024, got {shards!r}")
        if not lease > 0:
            raise ConfigurationError(f"lease must be a positive number of seconds, got {lease!r}")
        self.url = url
        self.shards = shards
        self.lease = float(lease)
        self.prefix = prefix
        self._client_options = client_options
        self._client: aioredis.Redis = None  # type: ignore[assignment]
        self._consumers: dict[tuple[str, str, str], _Consumer] = {}
        self._maintain_script: Any = None
        self._release_script: Any = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"a Redis broker URL starts with redis://, got {url!r}")
        ours: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        kinds: dict[str, type] = {"shards": int, "lease": float, "prefix": str}
        for name, raw in parse_qsl(parts.query, keep_blank_values=True):
            if name not in kinds:
                rest.append((name, raw))
                continue
            try:
                ours[name] = kinds[name](raw)
            except ValueError:
                raise ConfigurationError(
                    f"option {name}={raw!r} in {url!r} is not a valid {kinds[name].__name__}"
                ) from None
        client_url = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(client_url, **{**ours, **options})

    # -- keys ------------------------------------------------------------------------------

    def _stream(self, topic: str, shard: int) -> str:
        return f"{self.prefix}:{topic}:{'any' if shard == _ANY else shard}"

    def _lease(self, topic: str, shard: int, group: str) -> str:
        return f"{self.prefix}:{topic}:{shard}:lease:{group}"

    def _hold(self, topic: str, shard: int, group: str) -> str:
        return f"{self.prefix}:{topic}:{shard}:hold:{group}"

    def _members(self, topic: str, group: str) -> str:
        return f"{self.prefix}:{topic}:members:{group}"

    @property
    def _dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def _shard_of(self, key: str | None) -> int:
        return _ANY if key is None else zlib.crc32(key.encode()) % self.shards

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        options: dict[str, Any] = {
            "socket_connect_timeout": 5,
            # A link that stalls without a reset: a reply overdue this long drops the
            # connection and the command is retried on a new one. Reads block 0.1 s at most.
            "socket_timeout": _SOCKET_TIMEOUT,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
            **self._client_options,
            "protocol": 2,
            "decode_responses": False,
        }
        try:
            self._client = aioredis.Redis.from_url(self.url, **options)
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {self.url!r}: {exc}") from exc
        self._maintain_script = self._client.register_script(_MAINTAIN)
        self._release_script = self._client.register_script(_RELEASE)
        try:
            await self._client.ping()
        except RedisError as exc:
            await self._client.aclose()
            raise RedisBrokerError(f"cannot reach Redis at {self.url}: {exc}") from exc

    async def _close(self) -> None:
        for consumer in list(self._consumers.values()):
            with contextlib.suppress(RedisError, OSError):
                await self._leave_consumer(consumer)
        await self._client.aclose()

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        await self._append(
            [(self._stream(topic, self._shard_of(m.key)), _fields(m)) for m in messages]
        )

    async def _append(self, entries: Iterable[tuple[str, Mapping[Any, Any]]]) -> None:
        entries = list(entries)
        try:
            if len(entries) == 1:  # one XADD is atomic by itself: no MULTI/EXEC round
                [(stream, fields)] = entries
                await self._client.xadd(stream, dict(fields))
                return
            async with self._client.pipeline(transaction=True) as pipe:
                for stream, fields in entries:
                    pipe.xadd(stream, dict(fields))
                await pipe.execute()
        except RedisError as exc:
            raise RedisBrokerError(f"cannot publish to Redis: {exc}") from exc

    async def _declare(self, topic: str, group: str) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for shard in [_ANY, *range(self.shards)]:
                    pipe.xgroup_create(self._stream(topic, shard), group, id="$", mkstream=True)
                results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise RedisBrokerError(f"cannot declare {group!r} on {topic!r}: {exc}") from exc
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise RedisBrokerError(f"cannot declare {group!r} on {topic!r}: {result}")

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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await c.changed.wait()

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

    def _message(self, topic: str, fields: Mapping[bytes, bytes]) -> Message:
        raw_key = fields.get(b"k")
        key = _text(raw_key) if raw_key is not None else None  # another producer's bytes
        if b"ce" not in fields:  # another producer's entry: keep all of it for the dead letter
            kept = {_text(name): _text(value) for name, value in fields.items()}
            return Message(topic, {}, json.dumps(kept).encode(), key, kept)
        body = fields[b"ce"]
        try:
            return Message.from_structured(topic, body, key=key)
        except ValueError:
            return Message(topic, {}, body, key)  # decoding it reports InvalidCloudEvent

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
                self._drop_shard(c, number)
        surplus = len(owned) - c.fair
        for number in sorted(owned, reverse=True):
            if surplus <= 0:
                break
            shard = c.shards.get(number)
            if shard is not None and shard.busy:
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
        shard = _Shard(number)
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
            held = c.inflight.get(entry_id)
            if held is not None:  # still in this member's hands (after a reconnect)
                shard.entries.append(held)
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
            shard.entries.append(entry)
        await self._ack_foreign(c, gone)
        c.shards[number] = shard
        c.wake()

    async def _release(self, c: _Consumer, number: int) -> None:
        """Hand a shard back: entries read ahead go back undelivered, then the lease."""
        shard = c.shards.pop(number, None)
        stream = self._stream(c.topic, number)
        if shard is not None:
            await self._give_back(c, stream, shard.entries, idle=False)
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
        want = c.prefetch - len(c.inflight)
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
        shard = c.shards[_ANY]
        foreign: list[tuple[str, bytes]] = []
        for entry_id, fields in items:
            if fields.get(b"g", c.group.encode()) != c.group.encode():
                foreign.append((stream, entry_id))
            elif entry_id not in c.inflight and entry_id in counts:
                message = self._message(c.topic, fields)
                shard.entries.append(
                    _Entry(entry_id, _ANY, message, counts[entry_id], counted=True)
                )
        shard.entries.sort(key=lambda e: _order(e.id))
        await self._ack_foreign(c, foreign)

    def _drop_shard(self, c: _Consumer, number: int) -> None:
        c.shards.pop(number, None)

    def _forget_shards(self, c: _Consumer) -> None:
        c.shards.clear()
        c.shards[_ANY] = _Shard(_ANY)
        c.maintained = -math.inf

    async def _heartbeat(self, c: _Consumer) -> None:
        """Keep the member registered and its leases alive while it is busy elsewhere."""
        while not (c.left or self._closed):
            await asyncio.sleep(self.lease / 3)
            try:
                await self._maintain(c, acquire=False)
            except (RedisError, OSError) as exc:
                log.debug("redis broker: heartbeat failed: %s", exc)

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

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        await self._declare(dead.topic, dead.group)
        fields = dict(_fields(dead.message), g=dead.group)
        shard = self._shard_of(dead.message.key)
        await self._append([(self._stream(dead.topic, shard), fields)])

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        try:
            await self._client.hset(self._dlq, dead.id, json.dumps(dead.to_dict()))
        except RedisError as exc:
            raise RedisBrokerError(f"cannot store dead letter {dead.id}: {exc}") from exc

    async def _dead_letters(self) -> list[DeadLetter]:
        try:
            stored = await self._client.hgetall(self._dlq)
        except RedisError as exc:
            raise RedisBrokerError(f"cannot read dead letters: {exc}") from exc
        out = [DeadLetter.from_dict(json.loads(raw)) for raw in stored.values()]
        out.sort(key=lambda dead: (dead.failed_at, dead.id))
        return out

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        try:
            await self._client.hdel(self._dlq, dead_letter_id)
        except RedisError as exc:
            raise RedisBrokerError(f"cannot drop dead letter {dead_letter_id}: {exc}") from exc


def _order(entry_id: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in entry_id.split(b"-"))


def _fields(message: Message) -> dict[Any, Any]:
    fields: dict[Any, Any] = {"ce": message.structured()}
    if message.key is not None:
        fields["k"] = message.key
    return fields


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
