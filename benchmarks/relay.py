"""Scenario 18: the outbox relay from a SQLite store to Redis, NATS and RabbitMQ, one run.

One store file in the bench's temporary directory is filled once, untimed, with N events of
`brokers.OrderPlaced` (four fields) over 200 streams (`order-<n>`), appended through tidings
10 events at a time, 200 appends in flight at once (group commits). Every round of every
broker then publishes all N events once per side, the two sides taking turns (the order
rotating by round), each on names of its own for this run and round (`bench-<run id>-relay<n>-`
keys, exchanges and queues on Redis and RabbitMQ, `BENCH_<run id>_relay<n>_` streams on NATS),
all deleted after each round. One consumer group is declared on each side's topic beforehand
and never consumes, so RabbitMQ routes the messages into its queues and Redis and NATS keep
them, as they would in production. Nothing of connecting or declaring is timed.

- tidings: `OutboxRelay(store, broker, {"*": "orders"}, name=<per round>, batch_size=500)`
  on the store opened as `tidings relay` opens it (`open_store(url, codec=JSONCodec(
  TypeRegistry(), keep_unknown=True), create=False)`: events go out without their classes) and
  a broker from `open_broker(url, ...)` with every option at its default but the names (Redis
  `prefix=`, NATS `stream=` and `prefix=`, RabbitMQ a topic of its own). The clock runs around
  `await relay.catch_up()`: it reads the log in batches of 500 (`subscribe_batches`), publishes
  each batch with `broker.publish_records` (each event under its own id, keyed by its stream)
  and commits the relay's checkpoint (`commit_projection`) after the broker confirmed.
- raw: a plain loop with sqlite3 and the raw client doing the same work on the same file.
  Per batch: `SELECT <all event columns> FROM tidings_events WHERE position > ? ORDER BY
  position LIMIT 500`; each row becomes the message the adapter puts on the wire, with the same
  CloudEvents attributes (specversion, id = the stored id as UUID text, source, type, subject =
  the stream id, time in RFC 3339 from `recorded_at`, datacontenttype, schemaversion,
  streamversion, position, partitionkey = the stream id); the batch is published with the
  adapter's batching and acks; then `INSERT OR REPLACE` of a checkpoint row into a table of its
  own (`bench_relay_checkpoints`) and a COMMIT (WAL, synchronous=FULL, as the store's). Redis
  (redis.asyncio): the structured CloudEvent (the attributes' JSON with the stored data
  spliced in) as field `ce` and the key as `k`, one MULTI/EXEC pipeline of XADDs per batch,
  each to the key's shard stream `<prefix>:orders:<crc32(key) % 8>`. NATS (nats-py): binary
  mode (`ce-` headers, `content-type`, `Nats-Msg-Id: orders:<id>`, the data as the body) to
  subject `<prefix>.orders.<crc32(key) % 16>._` of a stream configured as tidings' (file
  storage, limits retention, 7-day max age, 120 s duplicate window), one
  `js.publish_async` per message, then the batch's acks gathered; the group is 17 durable pull
  consumers like tidings' (one per lane, deliver "new", explicit ack). RabbitMQ (aio-pika):
  binary mode (`cloudEvents_` headers, the content type and message id as AMQP properties,
  persistent) on a confirming channel to a durable direct exchange with routing key
  `crc32(key) % 8`, each batch's publishes gathered (every confirm awaited); the group is 8
  durable quorum queues bound by those keys, as tidings' group queues are. tidings adds a
  `Tidings-Key` header on NATS (the key, for its consumers), which the raw side does not send.

Each side must leave exactly N messages on the server per round (checked: the XLEN of the
side's streams, the NATS stream's message count, the message counts of the RabbitMQ queues
from a passive declare), and the relay must report N published and its checkpoint at the
head. The rate is N / the side's seconds; the best round per side is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import sqlite3
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from brokers import (
    NATSTarget,
    OrderPlaced,
    RabbitMQTarget,
    RedisTarget,
    Target,
    _version,
)
from sqlite_store import Measured
from tidings import OutboxRelay, open_broker, open_store
from tidings.brokers import BrokerBase
from tidings.brokers.envelope import encode as encode_message
from tidings.core.codec import JSONCodec
from tidings.core.events import TypeRegistry

Advance = Callable[[int], None]

TOPIC = "orders"
GROUP = "bench"
STREAMS = 200
PER_APPEND = 10  # events per append when filling the store
IN_FLIGHT = 200  # appends awaited together when filling the store
BATCH = 500  # the relay's default batch_size; the raw loop's batch too
REDIS_SHARDS = 8  # RedisBroker's default shards
NATS_LANES = 16  # NATSBroker's default shards
RABBITMQ_SHARDS = 8  # RabbitMQBroker's default shards
CHECKPOINTS = "bench_relay_checkpoints"
COLUMNS = "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata"
SELECT = f"SELECT {COLUMNS} FROM tidings_events WHERE position > ? ORDER BY position LIMIT ?"
SIDES = ("tidings", "raw")

Row = tuple[int, bytes, str, int, str, int, int, str, str | None]


def _url(path: str) -> str:
    return "sqlite:///" + path


# -- the store -----------------------------------------------------------------------------


def populate(directory: str, count: int, advance: Advance) -> tuple[str, int]:
    """A store file with `count` events (rounded down to whole appends) over `STREAMS`
    streams, appended through tidings; returns its path and the number of events."""
    path = os.path.join(directory, "relay.db")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
    appends = max(1, count // PER_APPEND)
    rng = random.Random(1800)
    currencies = ("EUR", "USD", "GBP", "CHF")

    def order() -> OrderPlaced:
        return OrderPlaced(
            order_id=f"ord-{rng.randrange(10**8):08d}",
            customer=f"cus-{rng.randrange(10**6):06d}",
            amount_cents=rng.randrange(100, 500_000),
            currency=rng.choice(currencies),
        )

    async def fill() -> None:
        async with open_store(_url(path)) as store:
            for lo in range(0, appends, IN_FLIGHT):
                hi = min(lo + IN_FLIGHT, appends)
                await asyncio.gather(
                    *(
                        store.append(f"order-{i % STREAMS}", [order() for _ in range(PER_APPEND)])
                        for i in range(lo, hi)
                    )
                )
                advance((hi - lo) * PER_APPEND)

    asyncio.run(fill())
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (name TEXT PRIMARY KEY, "
            "position INTEGER NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.commit()
        events = conn.execute("SELECT count(*) FROM tidings_events").fetchone()[0]
        first: Row = conn.execute(SELECT, (0, 1)).fetchone()
    finally:
        conn.close()
    check_same_wire(first)
    return path, int(events)


# -- the raw side's messages ------------------------------------------------------------------


def _time(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1e6, UTC).isoformat().replace("+00:00", "Z")


def attributes(row: Row) -> dict[str, Any]:
    """The CloudEvents attributes of a stored row, as the relay sends them."""
    position, raw_id, stream_id, version, type_, schema_version, recorded_at, _, _ = row
    return {
        "specversion": "1.0",
        "id": str(UUID(bytes=raw_id)),
        "source": "tidings",
        "type": type_,
        "subject": stream_id,
        "time": _time(recorded_at),
        "datacontenttype": "application/json",
        "schemaversion": schema_version,
        "streamversion": version,
        "position": position,
        "partitionkey": stream_id,
    }


def structured(row: Row) -> bytes:
    """The structured CloudEvent: the attributes' JSON with the stored data spliced in."""
    head = json.dumps(attributes(row), ensure_ascii=False, separators=(",", ":"))
    return f'{head[:-1]},"data":{row[7]}}}'.encode()


def binary(row: Row, prefix: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(attributes, headers, body) in binary mode: the attributes as `prefix` headers (text)."""
    attrs = attributes(row)
    headers: dict[str, Any] = {f"{prefix}{name}": str(value) for name, value in attrs.items()}
    del headers[f"{prefix}datacontenttype"]
    headers["content-type"] = "application/json"
    return attrs, headers, row[7].encode()


def check_same_wire(row: Row) -> None:
    """Fail loudly if the raw side's messages would differ from the relay's for `row`."""
    if row[8] is not None:
        raise SystemExit("the relay bench's raw side sends no metadata, but the store has some")

    position, raw_id, stream_id, version, type_, schema_version, micros, data, _ = row
    codec = JSONCodec(TypeRegistry(), keep_unknown=True)  # as the relay decodes it
    recorded_at = datetime.fromtimestamp(micros / 1e6, UTC)
    record = codec.decode(
        position,
        UUID(bytes=raw_id),
        stream_id,
        version,
        type_,
        schema_version,
        recorded_at,
        data,
        None,
    )
    message = encode_message(TOPIC, record.event, key=stream_id, record=record, codec=codec)
    if message.structured() != structured(row):
        raise SystemExit(f"Redis: {message.structured()!r} != raw {structured(row)!r}")
    for prefix in ("ce-", "cloudEvents_"):
        ours = message.binary_headers(prefix)
        _, theirs, body = binary(row, prefix)
        if ours != theirs or message.data != body:
            raise SystemExit(f"{prefix} headers: {ours!r} != raw {theirs!r}")


# -- the brokers -----------------------------------------------------------------------------


class Relayed(ABC):
    """One broker in scenario 18: the names of a round, the raw side, the counts, cleanup."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.url = target.url
        self.run_id = target.run_id

    def tag(self, number: int) -> str:
        return f"bench-{self.run_id}-relay{number}"

    @abstractmethod
    def tidings_options(self, number: int) -> tuple[str, dict[str, Any]]:
        """The tidings side's topic and `open_broker` options in round `number`."""

    @abstractmethod
    async def admin_open(self) -> None: ...

    @abstractmethod
    async def admin_close(self) -> None: ...

    @abstractmethod
    async def raw_open(self, number: int) -> None:
        """Connect the raw client and declare its group (untimed)."""

    @abstractmethod
    async def raw_publish(self, rows: list[Row]) -> None:
        """Publish one batch as the adapter does, returning once the broker confirmed it."""

    @abstractmethod
    async def raw_close(self) -> None: ...

    @abstractmethod
    async def count(self, side: str, number: int) -> int:
        """The messages the server holds for `side` in round `number`."""

    @abstractmethod
    async def cleanup(self, number: int | None) -> None:
        """Delete what round `number` (None: every round of this run) made."""


class RelayedRedis(Relayed):
    admin: Any = None
    client: Any = None
    raw_prefix = ""

    def _prefix(self, number: int, side: str) -> str:
        return f"{self.tag(number)}-{side}"

    def tidings_options(self, number: int) -> tuple[str, dict[str, Any]]:
        return TOPIC, {"prefix": self._prefix(number, "tidings")}

    async def admin_open(self) -> None:
        import redis.asyncio as aioredis

        self.admin = aioredis.Redis.from_url(self.url, protocol=2, decode_responses=False)

    async def admin_close(self) -> None:
        await self.admin.aclose()

    async def raw_open(self, number: int) -> None:
        import redis.asyncio as aioredis

        self.raw_prefix = self._prefix(number, "raw")
        self.client = aioredis.Redis.from_url(self.url, protocol=2, decode_responses=False)
        for shard in range(REDIS_SHARDS):
            stream = f"{self.raw_prefix}:{TOPIC}:{shard}"
            await self.client.xgroup_create(stream, GROUP, id="$", mkstream=True)

    async def raw_publish(self, rows: list[Row]) -> None:
        prefix = self.raw_prefix
        async with self.client.pipeline(transaction=True) as pipe:
            for row in rows:
                key = row[2]
                shard = zlib.crc32(key.encode()) % REDIS_SHARDS
                pipe.xadd(f"{prefix}:{TOPIC}:{shard}", {"ce": structured(row), "k": key})
            await pipe.execute()

    async def raw_close(self) -> None:
        await self.client.aclose()

    async def count(self, side: str, number: int) -> int:
        prefix = self._prefix(number, side)
        names = [*range(REDIS_SHARDS), "any"]
        return sum([int(await self.admin.xlen(f"{prefix}:{TOPIC}:{n}")) for n in names])

    async def cleanup(self, number: int | None) -> None:
        stem = f"bench-{self.run_id}-relay" + ("*" if number is None else f"{number}-*")
        keys = [key async for key in self.admin.scan_iter(match=stem, count=500)]
        for start in range(0, len(keys), 500):
            await self.admin.delete(*keys[start : start + 500])


class RelayedNATS(Relayed):
    nc: Any = None
    js: Any = None
    raw_nc: Any = None
    raw_js: Any = None
    raw_stream = ""
    raw_prefix = ""

    def _names(self, number: int, side: str) -> tuple[str, str]:
        """The stream and subject prefix of `side` in round `number`."""
        return (
            f"BENCH_{self.run_id}_relay{number}_{side.upper()}",
            f"bench_{self.run_id}_relay{number}_{side}",
        )

    def tidings_options(self, number: int) -> tuple[str, dict[str, Any]]:
        stream, prefix = self._names(number, "tidings")
        return TOPIC, {"stream": stream, "prefix": prefix}

    async def admin_open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url.split("?", 1)[0])
        self.js = self.nc.jetstream(timeout=5.0)

    async def admin_close(self) -> None:
        await self.nc.close()

    async def raw_open(self, number: int) -> None:
        import nats
        from nats.js import api

        self.raw_stream, self.raw_prefix = self._names(number, "raw")
        self.raw_nc = await nats.connect(self.url.split("?", 1)[0])
        self.raw_js = self.raw_nc.jetstream(timeout=5.0)
        await self.raw_js.add_stream(
            api.StreamConfig(  # what NATSBroker makes for its stream
                name=self.raw_stream,
                subjects=[f"{self.raw_prefix}.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=7 * 86400.0,
                duplicate_window=120.0,
            )
        )
        lanes = [*(str(n) for n in range(NATS_LANES)), "any"]
        await asyncio.gather(
            *(
                self.raw_js.add_consumer(
                    self.raw_stream,
                    api.ConsumerConfig(  # what NATSBroker makes for a group's lane
                        durable_name=f"{GROUP}-{lane}",
                        deliver_policy=api.DeliverPolicy.NEW,
                        ack_policy=api.AckPolicy.EXPLICIT,
                        ack_wait=30.0,
                        max_deliver=-1,
                        filter_subject=f"{self.raw_prefix}.{TOPIC}.{lane}.*",
                        max_ack_pending=1000 if lane == "any" else 1,
                        inactive_threshold=7 * 86400.0,
                    ),
                )
                for lane in lanes
            )
        )

    async def raw_publish(self, rows: list[Row]) -> None:
        publish, stream, prefix = self.raw_js.publish_async, self.raw_stream, self.raw_prefix
        futures = []
        for row in rows:
            attrs, headers, body = binary(row, "ce-")
            headers["Nats-Msg-Id"] = f"{TOPIC}:{attrs['id']}"
            lane = zlib.crc32(row[2].encode()) % NATS_LANES
            subject = f"{prefix}.{TOPIC}.{lane}._"
            futures.append(await publish(subject, body, stream=stream, headers=headers))
        await asyncio.gather(*futures)

    async def raw_close(self) -> None:
        await self.raw_nc.close()

    async def count(self, side: str, number: int) -> int:
        info = await self.js.stream_info(self._names(number, side)[0])
        return int(info.state.messages)

    async def cleanup(self, number: int | None) -> None:
        stem = f"BENCH_{self.run_id}_relay" + ("" if number is None else f"{number}_")
        for info in await self.js.streams_info():
            if info.config.name and info.config.name.startswith(stem):
                with contextlib.suppress(Exception):
                    await self.js.delete_stream(info.config.name)


class RelayedRabbitMQ(Relayed):
    connection: Any = None
    channel: Any = None
    raw_connection: Any = None
    raw_exchange: Any = None
    rounds = 8  # the most rounds a run makes (cleanup(None) looks at that many)

    def _topic(self, number: int) -> str:
        return f"{self.tag(number)}-{TOPIC}"

    def _queues(self, side: str, number: int) -> list[str]:
        if side == "tidings":  # the adapter's group queues: tidings:<topic>:<group>:<n|any>
            routes = [*(str(n) for n in range(RABBITMQ_SHARDS)), "any"]
            return [f"tidings:{self._topic(number)}:{GROUP}:{route}" for route in routes]
        return [f"{self.tag(number)}-raw:{n}" for n in range(RABBITMQ_SHARDS)]

    def tidings_options(self, number: int) -> tuple[str, dict[str, Any]]:
        return self._topic(number), {}

    async def admin_open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()

    async def admin_close(self) -> None:
        await self.connection.close()

    async def raw_open(self, number: int) -> None:
        import aio_pika

        self.raw_connection = await aio_pika.connect(self.url)
        channel = await self.raw_connection.channel(publisher_confirms=True)
        self.raw_exchange = await channel.declare_exchange(
            f"{self.tag(number)}-raw.x", aio_pika.ExchangeType.DIRECT, durable=True
        )
        for shard, name in enumerate(self._queues("raw", number)):
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(self.raw_exchange, routing_key=str(shard))

    async def raw_publish(self, rows: list[Row]) -> None:
        import aio_pika

        publish = self.raw_exchange.publish
        persistent = aio_pika.DeliveryMode.PERSISTENT
        sends = []
        for row in rows:
            attrs, headers, body = binary(row, "cloudEvents_")
            content_type = headers.pop("content-type")  # an AMQP property, not a header
            message = aio_pika.Message(
                body,
                headers=headers,
                content_type=content_type,
                delivery_mode=persistent,
                message_id=attrs["id"],
            )
            shard = zlib.crc32(row[2].encode()) % RABBITMQ_SHARDS
            sends.append(publish(message, routing_key=str(shard)))
        await asyncio.gather(*sends)  # each waits for its publisher confirm

    async def raw_close(self) -> None:
        await self.raw_connection.close()

    async def count(self, side: str, number: int) -> int:
        total = 0
        for name in self._queues(side, number):
            queue = await self.channel.declare_queue(name, passive=True)
            total += int(queue.declaration_result.message_count)
        return total

    async def cleanup(self, number: int | None) -> None:
        for n in range(self.rounds) if number is None else [number]:
            for name in [*self._queues("tidings", n), *self._queues("raw", n)]:
                with contextlib.suppress(Exception):
                    await self.channel.queue_delete(name)
            for name in (f"tidings:{self._topic(n)}", f"{self.tag(n)}-raw.x"):
                with contextlib.suppress(Exception):
                    await self.channel.exchange_delete(name)


def relayed(target: Target) -> Relayed:
    if isinstance(target, RedisTarget):
        return RelayedRedis(target)
    if isinstance(target, NATSTarget):
        return RelayedNATS(target)
    if isinstance(target, RabbitMQTarget):
        return RelayedRabbitMQ(target)
    raise TypeError(f"no relay scenario for {target!r}")


# -- the two sides ----------------------------------------------------------------------------


async def _tidings(path: str, broker: Relayed, number: int, events: int) -> float:
    """Relay the whole store with `OutboxRelay.catch_up()`; returns the seconds it took."""
    topic, options = broker.tidings_options(number)
    codec = JSONCodec(TypeRegistry(), keep_unknown=True)  # as `tidings relay` opens it
    async with (
        open_store(_url(path), codec=codec, create=False) as store,
        open_broker(broker.url, **options) as opened,
    ):
        assert isinstance(opened, BrokerBase)
        await opened.declare(topic, GROUP)
        relay = OutboxRelay(
            store, opened, {"*": topic}, name=f"bench-{broker.run_id}-{number}", batch_size=BATCH
        )
        head = await store.last_position()
        gc.collect()
        start = time.perf_counter()
        reached = await relay.catch_up()
        seconds = time.perf_counter() - start
    if relay.published != events or reached != head:
        raise SystemExit(
            f"{broker.target.title}, round {number}: the relay published {relay.published} of "
            f"{events} events and reached {reached} of {head}"
        )
    return seconds


async def _raw(path: str, broker: Relayed, number: int) -> float:
    """The raw loop over the same rows; returns the seconds it took."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 5000")
    name = f"bench-{broker.run_id}-{number}"
    await broker.raw_open(number)
    try:
        gc.collect()
        start = time.perf_counter()
        after = 0
        while True:
            rows: list[Row] = conn.execute(SELECT, (after, BATCH)).fetchall()
            if not rows:
                break
            await broker.raw_publish(rows)
            after = rows[-1][0]
            conn.execute(
                f"INSERT OR REPLACE INTO {CHECKPOINTS} (name, position, updated_at) "
                "VALUES (?, ?, ?)",
                (name, after, time.time_ns() // 1000),
            )
            conn.commit()
        seconds = time.perf_counter() - start
    finally:
        await broker.raw_close()
        conn.close()
    return seconds


async def _round(
    path: str, broker: Relayed, number: int, events: int, advance: Advance
) -> dict[str, float]:
    await broker.admin_open()
    try:
        rates: dict[str, float] = {}
        order = SIDES[number % 2 :] + SIDES[: number % 2]
        for side in order:
            if side == "tidings":
                seconds = await _tidings(path, broker, number, events)
            else:
                seconds = await _raw(path, broker, number)
            held = await broker.count(side, number)
            if held != events:
                raise SystemExit(
                    f"{broker.target.title}, round {number}: the {side} side left {held} "
                    f"messages on the server for {events} events"
                )
            rates[side] = events / seconds
            advance(events)
        return rates
    finally:
        try:
            await broker.cleanup(number)
        finally:
            await broker.admin_close()


async def _cleanup_all(broker: Relayed) -> None:
    await broker.admin_open()
    try:
        await broker.cleanup(None)
    finally:
        await broker.admin_close()


def measure(target: Target, path: str, events: int, rounds: int, advance: Advance) -> Measured:
    """Relay the `events` of the store at `path` to `target`, both sides, `rounds` times."""
    broker = relayed(target)
    measured = Measured()
    try:
        for number in range(rounds):
            rates = asyncio.run(_round(path, broker, number, events, advance))
            measured.tidings.append(rates["tidings"])
            measured.raw.append(rates["raw"])
    finally:
        asyncio.run(_cleanup_all(broker))
    measured.info = {
        "broker": target.title,
        "server": target.server,
        "clients": {name: _version(name) for name in ("redis", "nats-py", "aio-pika")},
        "events": events,
        "streams": STREAMS,
        "batch_size": BATCH,
        "timed": "OutboxRelay.catch_up() from the first read to the last checkpoint commit; "
        "raw: the same loop (read 500 rows, publish with the adapter's batching and acks, "
        "commit a checkpoint row)",
        "rates": {"tidings": list(measured.tidings), "raw": list(measured.raw)},
    }
    return measured
