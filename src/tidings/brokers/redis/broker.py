"""`RedisBroker`: the URL and options, connecting, publishing, declaring groups, dead letters."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.brokers.base import BrokerBase, DeadLetter, option_types
from tidings.brokers.envelope import Message
from tidings.brokers.redis.errors import RedisBrokerError
from tidings.brokers.redis.leases import _MAINTAIN, _RELEASE, _Leases
from tidings.brokers.redis.member import _Consumer, _Members
from tidings.brokers.redis.records import _ANY, _fields
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError

_SOCKET_TIMEOUT = 30.0  # seconds a reply may take (`?socket_timeout=` sets it)


class RedisBroker(_Members, _Leases, BrokerBase):
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
        kinds = option_types(cls)  # the rest of the query goes to the Redis client
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

    def _bounded(self) -> asyncio.Timeout:
        """One operation's bound: a reply overdue this long means the link stalled."""
        return asyncio.timeout(self._bound)

    async def _open(self) -> None:
        # A link that stalls without a reset: a reply overdue `_bound` seconds fails the
        # operation (`_bounded`; reads block 0.1 s at most). Bounded here, once per operation,
        # not by redis-py's socket_timeout, which wraps every write in `asyncio.wait_for`: a
        # task per command, a tenth of a publish. `?socket_timeout=` still sets redis-py's.
        asked = self._client_options.get("socket_timeout") or dict(
            parse_qsl(urlsplit(self.url).query)
        ).get("socket_timeout")
        self._bound = float(asked or _SOCKET_TIMEOUT)
        options: dict[str, Any] = {
            "socket_connect_timeout": 5,
            "socket_timeout": None,
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
        await self._leave_all()
        await self._client.aclose()

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        await self._append(
            [(self._stream(topic, self._shard_of(m.key)), _fields(m)) for m in messages]
        )

    async def _append(self, entries: Iterable[tuple[str, Mapping[Any, Any]]]) -> None:
        entries = list(entries)
        try:
            async with self._bounded():
                if len(entries) == 1:  # one XADD is atomic by itself: no MULTI/EXEC round
                    [(stream, fields)] = entries
                    await self._client.xadd(stream, dict(fields))
                    return
                async with self._client.pipeline(transaction=True) as pipe:
                    for stream, fields in entries:
                        pipe.xadd(stream, dict(fields))
                    await pipe.execute()
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(f"cannot publish to Redis: {_reason(exc)}") from exc

    async def _declare(self, topic: str, group: str) -> None:
        try:
            async with self._bounded(), self._client.pipeline(transaction=False) as pipe:
                for shard in [_ANY, *range(self.shards)]:
                    pipe.xgroup_create(self._stream(topic, shard), group, id="$", mkstream=True)
                results = await pipe.execute(raise_on_error=False)
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(
                f"cannot declare {group!r} on {topic!r}: {_reason(exc)}"
            ) from exc
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise RedisBrokerError(f"cannot declare {group!r} on {topic!r}: {result}")

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        await self._declare(dead.topic, dead.group)
        fields = dict(_fields(dead.message), g=dead.group)
        shard = self._shard_of(dead.message.key)
        await self._append([(self._stream(dead.topic, shard), fields)])

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        try:
            async with self._bounded():
                await self._client.hset(self._dlq, dead.id, json.dumps(dead.to_dict()))
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(f"cannot store dead letter {dead.id}: {_reason(exc)}") from exc

    async def _dead_letters(self) -> list[DeadLetter]:
        try:
            async with self._bounded():
                stored = await self._client.hgetall(self._dlq)
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(f"cannot read dead letters: {_reason(exc)}") from exc
        out = [DeadLetter.from_dict(json.loads(raw)) for raw in stored.values()]
        out.sort(key=lambda dead: (dead.failed_at, dead.id))
        return out

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        try:
            async with self._bounded():
                await self._client.hdel(self._dlq, dead_letter_id)
        except (RedisError, TimeoutError) as exc:
            raise RedisBrokerError(
                f"cannot drop dead letter {dead_letter_id}: {_reason(exc)}"
            ) from exc


def _reason(exc: BaseException) -> str:
    return str(exc) or f"no reply within the bound ({type(exc).__name__})"
