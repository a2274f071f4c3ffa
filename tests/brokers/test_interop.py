"""Interop, both ways, with each broker's plain client and the official CloudEvents SDK.

A foreign producer builds its event with `cloudevents` (the SDK's bindings and its JSON event
format) and publishes it with the broker's own client exactly where the adapter's module
docstring says a topic lives; a tidings `Service` handler receives it typed. The other way,
`broker.publish` writes a message that the plain client reads raw and the SDK parses. A message
from outside that is no CloudEvent at all is dead-lettered with a reason and the consumer goes
on (the conformance suite covers malformed messages published through tidings itself).

Redis Streams carries structured mode only (an entry has no headers). NATS JetStream carries
binary mode with the `ce-` headers of the HTTP binding, and structured mode. RabbitMQ carries
binary mode with the AMQP binding's `cloudEvents_` headers, and structured mode. Kafka carries
the Kafka binding: binary mode (`ce_` headers, UTF-8 as is with no percent-encoding, the data
content type as `content-type`, the data as the value) and structured mode (`content-type:
application/cloudevents+json`, the whole event as the value), in both the partition key as the
record key. Each broker's cases run only when it is in `TIDINGS_TEST_BROKERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import nats
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from aiokafka.partitioner import murmur2  # type: ignore[import-untyped]
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp, http, kafka
from cloudevents.core.bindings.amqp import AMQPMessage
from cloudevents.core.bindings.http import HTTPMessage
from cloudevents.core.bindings.kafka import KafkaMessage
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from nats.js import JetStreamContext, api

import tidings
from tests.backends import BROKER_BACKENDS, NATS, RABBITMQ, REDIS, broker_url, kafka_url, require
from tidings.brokers import BrokerBase, DeadLetter, Message, open_broker
from tidings.core.recorded import RecordedEvent

if TYPE_CHECKING:
    import aio_pika.abc

TYPE = "test.interop.shipped"
SOURCE = "https://shop.example/shipping"
WHEN = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)  # whole ms: AMQP timestamps are ms
KEY = "order-7"
FORMAT = JSONFormat()
# The adapters' defaults, which place a key's messages (see their module docstrings).
REDIS_SHARDS = 8
NATS_SHARDS = 16
RABBITMQ_SHARDS = 8
KAFKA_PARTITIONS = 8
NATS_STREAM = "TIDINGS"


class Shipped(tidings.Event, type=TYPE):
    order: str
    items: int
    note: str | None = None


@pytest.fixture
def topic() -> str:
    return f"interop-{uuid.uuid4().hex[:10]}"


def enabled(backend: str) -> None:
    """Skip a broker left out of `TIDINGS_TEST_BROKERS`; `require` its running server."""
    if backend not in BROKER_BACKENDS:
        pytest.skip(f"{backend} is not in TIDINGS_TEST_BROKERS ({','.join(BROKER_BACKENDS)})")
    require(backend)


def sdk_event(key: str | None = KEY, **extensions: str) -> CloudEvent:
    """An event as a foreign producer makes it with the SDK, with an extension `tenant` and
    the partitioning extension when it has a key."""
    attributes: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "type": TYPE,
        "time": WHEN,
        "datacontenttype": "application/json",
        "tenant": "acme",
        **extensions,
    }
    if key is not None:
        attributes["partitionkey"] = key
    return CloudEvent(attributes, {"order": "o-7", "items": 3})


@dataclass
class Handled:
    """What a tidings handler saw of one message."""

    event: Shipped
    record: RecordedEvent[Any]
    message: Message
    key: str | None
    attempt: int


async def consume(
    broker: BrokerBase,
    topic: str,
    publish: Callable[[], Awaitable[None]],
    *,
    dead: int = 0,
    timeout: float = 20,
) -> tuple[list[Handled], list[DeadLetter]]:
    """Declare a fresh group, let the foreign producer `publish`, then run a tidings service
    with a handler typed `Shipped` until it handled one event and `dead` messages went to the
    dead letters."""
    group = f"g-{uuid.uuid4().hex[:10]}"
    service = tidings.Service(group, broker)
    handled: list[Handled] = []

    @service.handler(topic)
    async def on_shipped(event: Shipped, ctx: tidings.Context) -> None:
        delivery = ctx.delivery
        handled.append(Handled(event, delivery.record, delivery.message, delivery.key, ctx.attempt))

    await broker.declare(topic, group)
    await publish()
    runner = asyncio.create_task(service.run())
    letters: list[DeadLetter] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                if runner.done():
                    runner.result()
                    raise AssertionError("the service stopped by itself")
                letters = await broker.dead_letters(topic)
                if len(letters) > dead:  # fail at once, saying why, rather than time out
                    raise AssertionError(f"dead-lettered: {[d.error for d in letters]}")
                if handled and len(letters) == dead:
                    break
                await asyncio.sleep(0.05)
    finally:
        service.stop()
        async with asyncio.timeout(15):
            await runner
    assert all(letter.group == group for letter in letters)
    return handled, letters


def assert_handled(handled: list[Handled], ce: CloudEvent, key: str | None) -> None:
    """The one handled event is the SDK's: id, source, type, time, data, extension, key."""
    [seen] = handled
    assert (seen.event.order, seen.event.items, seen.event.note) == ("o-7", 3, None)
    assert seen.record.id == uuid.UUID(ce.get_id())
    assert seen.event.event_id == uuid.UUID(ce.get_id())
    assert seen.record.type == TYPE
    assert seen.record.recorded_at == WHEN
    assert seen.record.stream_id == SOURCE  # no subject: the source names the stream
    assert seen.message.attributes["source"] == SOURCE
    assert seen.message.attributes["specversion"] == "1.0"
    assert seen.record.metadata.headers.get("tenant") == "acme"  # the extension survives
    assert seen.record.metadata.correlation_id is None
    assert seen.key == key
    assert seen.attempt == 1


def published_event() -> tuple[Shipped, dict[str, str]]:
    return Shipped(order="o-9", items=5, note="fragile"), {
        "correlation_id": "req-42",
        "tenant": "acme",
    }


def assert_parsed(parsed: BaseCloudEvent, event: Shipped, key: str | None) -> None:
    """The SDK's reading of a message tidings published matches the event."""
    assert parsed.get_specversion() == "1.0"
    assert parsed.get_id() == str(event.event_id)
    assert parsed.get_type() == TYPE
    assert parsed.get_source() == "tidings"
    assert parsed.get_datacontenttype() == "application/json"
    assert parsed.get_data() == {"order": "o-9", "items": 5, "note": "fragile"}
    assert parsed.get_extension("partitionkey") == key
    assert parsed.get_extension("tenant") == "acme"
    assert parsed.get_extension("correlationid") == "req-42"
    time = parsed.get_time()
    assert time is not None and abs(datetime.now(UTC) - time) < timedelta(minutes=5)


def assert_invalid(letters: list[DeadLetter], topic: str, *kept: str) -> None:
    """Each dead letter says InvalidCloudEvent; together they keep each of the `kept` texts
    of the original messages (in their attributes or data)."""
    for letter in letters:
        assert letter.topic == topic
        assert letter.error.startswith("InvalidCloudEvent: "), letter.error
        assert letter.attempts == 1
    texts = [json.dumps(letter.to_dict()) for letter in letters]
    for text in kept:
        assert any(text in found for found in texts), (text, texts)


# -- Redis Streams: structured mode in the entry field `ce`, the key in `k` -----------------


def redis_stream(topic: str, key: str | None) -> str:
    shard = "any" if key is None else str(zlib.crc32(key.encode()) % REDIS_SHARDS)
    return f"tidings:{topic}:{shard}"


@pytest.fixture
async def redis(topic: str) -> AsyncIterator[tuple[BrokerBase, aioredis.Redis]]:
    enabled("redis")
    async with open_broker(broker_url("redis")) as broker:
        client = aioredis.Redis.from_url(REDIS)
        try:
            yield broker, client
        finally:
            keys = [key async for key in client.scan_iter(match=f"tidings:{topic}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "keyless"])
async def test_redis_a_plain_client_publishes_an_sdk_event_and_a_handler_gets_it(
    redis: tuple[BrokerBase, aioredis.Redis], topic: str, key: str | None
) -> None:
    broker, client = redis
    ce = sdk_event(key)

    async def publish() -> None:
        fields: dict[str, str | bytes] = {"ce": FORMAT.write(ce)}
        if key is not None:
            fields["k"] = key
        await client.xadd(redis_stream(topic, key), fields)  # type: ignore[arg-type]

    handled, _ = await consume(broker, topic, publish)
    assert_handled(handled, ce, key)


async def test_redis_a_published_event_is_read_by_a_plain_client_and_parsed_by_the_sdk(
    redis: tuple[BrokerBase, aioredis.Redis], topic: str
) -> None:
    broker, client = redis
    event, metadata = published_event()
    await broker.publish(topic, event, key=KEY, metadata=metadata)
    entries = await client.xrange(redis_stream(topic, KEY))
    [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], entries)
    assert fields[b"k"] == KEY.encode()
    parsed = FORMAT.read(CloudEvent, fields[b"ce"])
    assert_parsed(parsed, event, KEY)


async def test_redis_entries_that_are_no_cloudevent_are_dead_lettered_and_the_consumer_goes_on(
    redis: tuple[BrokerBase, aioredis.Redis], topic: str
) -> None:
    broker, client = redis
    ce = sdk_event(None)
    stream = redis_stream(topic, None)

    async def publish() -> None:
        await client.xadd(stream, {"text": "hello"})  # no `ce` field at all
        await client.xadd(stream, {"ce": "plain text"})
        await client.xadd(stream, {"ce": json.dumps({"order": "o-7", "items": 3})})
        await client.xadd(stream, {"ce": FORMAT.write(ce)})

    handled, letters = await consume(broker, topic, publish, dead=3)
    assert_handled(handled, ce, None)
    assert len(letters) == 3
    assert_invalid(letters, topic, "plain text", '"order": "o-7"')


# -- NATS JetStream: subjects tidings.<topic>.<lane>._ in stream TIDINGS --------------------


def nats_subject(topic: str, key: str | None) -> str:
    lane = "any" if key is None else str(zlib.crc32(key.encode()) % NATS_SHARDS)
    return f"tidings.{topic}.{lane}._"


@pytest.fixture
async def jetstream() -> AsyncIterator[tuple[BrokerBase, JetStreamContext]]:
    enabled("nats")
    async with open_broker(broker_url("nats")) as broker:  # it creates the stream
        nc = await nats.connect(NATS)
        try:
            yield broker, nc.jetstream()
        finally:
            await nc.close()


def nats_message(ce: CloudEvent, mode: str) -> HTTPMessage:
    """The SDK's binary (`ce-` headers, as the HTTP binding) or structured rendering."""
    return http.to_binary(ce, FORMAT) if mode == "binary" else http.to_structured(ce, FORMAT)


@pytest.mark.parametrize(
    ("mode", "key"),
    [("binary", KEY), ("binary", None), ("structured", KEY)],
    ids=["binary-keyed", "binary-keyless", "structured-keyed"],
)
async def test_nats_a_plain_client_publishes_an_sdk_event_and_a_handler_gets_it(
    jetstream: tuple[BrokerBase, JetStreamContext], topic: str, mode: str, key: str | None
) -> None:
    broker, js = jetstream
    ce = sdk_event(key)
    wire = nats_message(ce, mode)

    async def publish() -> None:
        await js.publish(nats_subject(topic, key), wire.body, headers=wire.headers)

    handled, _ = await consume(broker, topic, publish)
    assert_handled(handled, ce, key)


async def test_nats_percent_encoded_binary_header_values_are_decoded(
    jetstream: tuple[BrokerBase, JetStreamContext], topic: str
) -> None:
    broker, js = jetstream
    ce = sdk_event(None, tenant="acme corp")
    wire = nats_message(ce, "binary")
    assert wire.headers["ce-tenant"] == "acme%20corp"

    async def publish() -> None:
        await js.publish(nats_subject(topic, None), wire.body, headers=wire.headers)

    [seen], _ = await consume(broker, topic, publish)
    assert seen.record.metadata.headers.get("tenant") == "acme corp"


async def read_with_plain_consumer(
    js: JetStreamContext, topic: str, publish: Callable[[], Awaitable[None]]
) -> tuple[str, dict[str, str], bytes]:
    """Subject, headers and body of the one message `publish` puts on `topic`, read through
    a consumer of the plain client's own (created first, removed after)."""
    name = f"interop-{uuid.uuid4().hex[:10]}"
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, inactive_threshold=60.0)
    sub = await js.pull_subscribe(
        f"tidings.{topic}.>", durable=name, stream=NATS_STREAM, config=config
    )
    try:
        await publish()
        async with asyncio.timeout(10):
            [msg] = await sub.fetch(1, timeout=5)
        await msg.ack()
        return msg.subject, dict(msg.headers or {}), msg.data
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(NATS_STREAM, name)


async def test_nats_a_published_event_is_read_by_a_plain_client_and_parsed_by_the_sdk(
    jetstream: tuple[BrokerBase, JetStreamContext], topic: str
) -> None:
    broker, js = jetstream
    event, metadata = published_event()

    async def publish() -> None:
        await broker.publish(topic, event, key=KEY, metadata=metadata)

    subject, headers, body = await read_with_plain_consumer(js, topic, publish)
    assert subject == nats_subject(topic, KEY)
    assert headers["ce-specversion"] == "1.0"  # binary mode
    parsed = http.from_http(HTTPMessage(headers, body), FORMAT)
    assert_parsed(parsed, event, KEY)


async def test_nats_header_values_are_percent_encoded_and_the_sdk_decodes_them(
    jetstream: tuple[BrokerBase, JetStreamContext], topic: str
) -> None:
    """A value a header cannot carry as is (a line break, spaces, a percent sign) travels
    percent-encoded, as the HTTP binding says: the SDK reads back the original."""
    broker, js = jetstream
    event, metadata = published_event()
    metadata["address"] = "1 Main St\nSpringfield 100%"

    async def publish() -> None:
        await broker.publish(topic, event, key=KEY, metadata=metadata)

    subject, headers, body = await read_with_plain_consumer(js, topic, publish)
    assert subject == nats_subject(topic, KEY)
    assert headers["ce-address"] == "1%20Main%20St%0ASpringfield%20100%25"
    parsed = http.from_http(HTTPMessage(headers, body), FORMAT)
    assert_parsed(parsed, event, KEY)
    assert parsed.get_extension("address") == "1 Main St\nSpringfield 100%"


async def test_nats_messages_that_are_no_cloudevent_are_dead_lettered_and_the_consumer_goes_on(
    jetstream: tuple[BrokerBase, JetStreamContext], topic: str
) -> None:
    broker, js = jetstream
    ce = sdk_event(None)
    subject = nats_subject(topic, None)
    good = nats_message(ce, "binary")
    not_ce = json.dumps({"order": "o-7", "items": 3}).encode()

    async def publish() -> None:
        await js.publish(subject, b"plain text")  # no headers at all
        await js.publish(subject, not_ce, headers={"content-type": "application/json"})
        await js.publish(subject, good.body, headers=good.headers)

    handled, letters = await consume(broker, topic, publish, dead=2)
    assert_handled(handled, ce, None)
    assert len(letters) == 2
    assert_invalid(letters, topic, "plain text", '"order": "o-7"')


# -- RabbitMQ: exchange tidings:<topic>, routing key crc32(key) % shards or `any` ------------


def rabbitmq_route(key: str | None) -> str:
    return "any" if key is None else str(zlib.crc32(key.encode()) % RABBITMQ_SHARDS)


def rabbitmq_exchange(topic: str) -> str:
    return f"tidings:{topic}"


@pytest.fixture
async def rabbitmq() -> AsyncIterator[tuple[BrokerBase, aio_pika.abc.AbstractConnection]]:
    enabled("rabbitmq")
    import aio_pika

    async with open_broker(broker_url("rabbitmq")) as broker:
        connection = await aio_pika.connect(RABBITMQ)
        try:
            yield broker, connection
        finally:
            await connection.close()


def rabbitmq_message(ce: CloudEvent, mode: str) -> AMQPMessage:
    """The SDK's AMQP binding: `cloudEvents_` application properties (`time` as an AMQP
    timestamp, milliseconds since the epoch; or, with `binary-text-time`, as the RFC 3339
    string the binding allows too), or structured."""
    if mode == "structured":
        return amqp.to_structured(ce, FORMAT)
    wire = amqp.to_binary(ce, FORMAT)
    if mode == "binary-text-time":
        time = ce.get_time()
        assert time is not None
        text = time.isoformat().replace("+00:00", "Z")
        wire.application_properties["cloudEvents_time"] = text
    return wire


async def amqp_publish(
    connection: aio_pika.abc.AbstractConnection, topic: str, key: str | None, wire: AMQPMessage
) -> None:
    """Publish as a plain aio-pika producer: properties as AMQP 0-9-1 headers, content type
    as the content-type property, to the topic's exchange (which must already exist)."""
    import aio_pika

    async with connection.channel() as channel:
        exchange = await channel.get_exchange(rabbitmq_exchange(topic))
        message = aio_pika.Message(
            wire.application_data,
            headers=wire.application_properties,
            content_type=wire.properties.get("content-type"),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=rabbitmq_route(key))


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        pytest.param("binary", KEY, id="binary-keyed"),
        pytest.param("binary", None, id="binary-keyless"),
        pytest.param("binary-text-time", KEY, id="binary-text-time-keyed"),
        pytest.param("binary-text-time", None, id="binary-text-time-keyless"),
        pytest.param("structured", KEY, id="structured-keyed"),
    ],
)
async def test_rabbitmq_a_plain_client_publishes_an_sdk_event_and_a_handler_gets_it(
    rabbitmq: tuple[BrokerBase, aio_pika.abc.AbstractConnection],
    topic: str,
    mode: str,
    key: str | None,
) -> None:
    broker, connection = rabbitmq
    ce = sdk_event(key)
    wire = rabbitmq_message(ce, mode)

    async def publish() -> None:
        await amqp_publish(connection, topic, key, wire)

    handled, _ = await consume(broker, topic, publish)
    assert_handled(handled, ce, key)


async def test_rabbitmq_a_published_event_is_read_by_a_plain_client_and_parsed_by_the_sdk(
    rabbitmq: tuple[BrokerBase, aio_pika.abc.AbstractConnection], topic: str
) -> None:
    import aio_pika

    broker, connection = rabbitmq
    event, metadata = published_event()
    async with connection.channel() as channel:
        exchange = await channel.declare_exchange(
            rabbitmq_exchange(topic), aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key=rabbitmq_route(KEY))
        await broker.publish(topic, event, key=KEY, metadata=metadata)
        async with asyncio.timeout(10), queue.iterator() as incoming_messages:
            incoming = await anext(aiter(incoming_messages))
            await incoming.ack()
    assert incoming.headers["cloudEvents_specversion"] == "1.0"  # binary mode
    wire = AMQPMessage(
        properties={"content-type": incoming.content_type},
        application_properties=dict(incoming.headers),
        application_data=incoming.body,
    )
    parsed = amqp.from_amqp(wire, FORMAT)
    assert_parsed(parsed, event, KEY)


async def test_rabbitmq_messages_that_are_no_cloudevent_are_dead_lettered_and_the_consumer_goes_on(
    rabbitmq: tuple[BrokerBase, aio_pika.abc.AbstractConnection], topic: str
) -> None:
    broker, connection = rabbitmq
    ce = sdk_event(None)
    not_ce = json.dumps({"order": "o-7", "items": 3}).encode()
    plain = AMQPMessage(properties={}, application_properties={}, application_data=b"plain text")
    json_only = AMQPMessage(
        properties={"content-type": "application/json"},
        application_properties={},
        application_data=not_ce,
    )

    async def publish() -> None:
        await amqp_publish(connection, topic, None, plain)
        await amqp_publish(connection, topic, None, json_only)
        await amqp_publish(connection, topic, None, rabbitmq_message(ce, "structured"))

    handled, letters = await consume(broker, topic, publish, dead=2)
    assert_handled(handled, ce, None)
    assert len(letters) == 2
    assert_invalid(letters, topic, "plain text", '"order": "o-7"')


# -- Kafka: the topic of the same name, the ordering key as the record key ------------------


def kafka_partition(key: str) -> int:
    """The partition of a keyed record: Kafka's murmur2 of the key, as the Java client."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % KAFKA_PARTITIONS


@dataclass
class KafkaClients:
    broker: BrokerBase
    producer: Any  # AIOKafkaProducer
    servers: str


@pytest.fixture
async def kafka_clients(topic: str) -> AsyncIterator[KafkaClients]:
    enabled("kafka")
    url = kafka_url()
    servers = urlsplit(url).netloc
    try:
        async with open_broker(url) as broker:
            producer = AIOKafkaProducer(
                bootstrap_servers=servers, enable_idempotence=False, acks="all"
            )
            await producer.start()
            try:
                yield KafkaClients(broker, producer, servers)
            finally:
                await producer.stop()
    finally:  # the test's topic goes (a cluster that refuses to delete topics keeps it)
        admin = AIOKafkaAdminClient(bootstrap_servers=servers)
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            async with asyncio.timeout(10):
                await admin.start()
                await admin.delete_topics([topic])
        await admin.close()


def kafka_message(ce: CloudEvent, mode: str, key: str | None = None) -> KafkaMessage:
    """The SDK's Kafka binding, binary (`ce_` headers) or structured; the record key is the
    event's `partitionkey`, or `key` when given (the event may then have none)."""
    write = kafka.to_binary if mode == "binary" else kafka.to_structured
    if key is None:
        return write(ce, FORMAT)
    return write(ce, FORMAT, key_mapper=lambda _: key)


async def kafka_send(
    producer: Any, topic: str, wire: KafkaMessage, *, partition: int | None = None
) -> None:
    """Publish as a plain aiokafka producer: headers, key and value as the binding made them
    (the topic must already exist: tidings creates it with its partitions)."""
    key = wire.key.encode() if isinstance(wire.key, str) else wire.key
    await producer.send_and_wait(
        topic, wire.value, key=key, partition=partition, headers=list(wire.headers.items())
    )


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        pytest.param("binary", KEY, id="binary-keyed"),
        pytest.param("binary", None, id="binary-keyless"),
        pytest.param("structured", KEY, id="structured-keyed"),
        pytest.param("structured", None, id="structured-keyless"),
    ],
)
async def test_kafka_a_plain_client_publishes_an_sdk_event_and_a_handler_gets_it(
    kafka_clients: KafkaClients, topic: str, mode: str, key: str | None
) -> None:
    ce = sdk_event(key)
    wire = kafka_message(ce, mode)
    assert wire.key == key
    if mode == "binary":
        assert wire.headers["ce_specversion"] == b"1.0"
        assert wire.headers["content-type"] == b"application/json"
    else:
        assert wire.headers == {"content-type": b"application/cloudevents+json"}

    async def publish() -> None:
        await kafka_send(kafka_clients.producer, topic, wire)

    handled, _ = await consume(kafka_clients.broker, topic, publish)
    assert_handled(handled, ce, key)


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_kafka_the_record_key_alone_is_the_key(
    kafka_clients: KafkaClients, topic: str, mode: str
) -> None:
    """A producer that keys its records but puts no `partitionkey` in the event: the binding
    maps the record key to the partition key, and so does tidings."""
    ce = sdk_event(None)
    wire = kafka_message(ce, mode, key=KEY)
    assert wire.key == KEY
    assert "ce_partitionkey" not in wire.headers

    async def publish() -> None:
        await kafka_send(kafka_clients.producer, topic, wire)

    handled, _ = await consume(kafka_clients.broker, topic, publish)
    assert_handled(handled, ce, KEY)


async def test_kafka_binary_header_values_are_utf8_as_is(
    kafka_clients: KafkaClients, topic: str
) -> None:
    """The Kafka binding percent-encodes nothing: a `%`, a space, a line break or a letter
    beyond ASCII arrives as the producer wrote it."""
    tenant = "acme corp 100%20 \u00e9t\u00e9\nnorth"
    ce = sdk_event(None, tenant=tenant)
    wire = kafka_message(ce, "binary")
    assert wire.headers["ce_tenant"] == tenant.encode()

    async def publish() -> None:
        await kafka_send(kafka_clients.producer, topic, wire)

    [seen], _ = await consume(kafka_clients.broker, topic, publish)
    assert seen.record.metadata.headers.get("tenant") == tenant


async def read_raw(servers: str, topic: str) -> Any:
    """The one record on `topic`, read by a plain consumer without a group: every partition
    assigned and read from its beginning."""
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, n) for n in range(KAFKA_PARTITIONS)])
        await consumer.seek_to_beginning()
        records: list[Any] = []
        async with asyncio.timeout(10):
            while not records:
                batches = await consumer.getmany(timeout_ms=500)
                records = [record for batch in batches.values() for record in batch]
        [record] = records
        return record
    finally:
        await consumer.stop()


def kafka_wire(record: Any) -> KafkaMessage:
    headers = dict(record.headers)
    assert len(headers) == len(record.headers)  # no header twice
    return KafkaMessage(headers=headers, key=record.key, value=record.value)


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "keyless"])
async def test_kafka_a_published_event_is_read_by_a_plain_client_and_parsed_by_the_sdk(
    kafka_clients: KafkaClients, topic: str, key: str | None
) -> None:
    event, metadata = published_event()
    await kafka_clients.broker.publish(topic, event, key=key, metadata=metadata)
    record = await read_raw(kafka_clients.servers, topic)
    if key is None:
        assert record.key is None
    else:
        assert record.key == key.encode()
        assert record.partition == kafka_partition(key)  # where a Java producer puts it
    wire = kafka_wire(record)
    assert wire.headers["ce_specversion"] == b"1.0"  # binary mode
    assert wire.headers["ce_id"] == str(event.event_id).encode()
    assert wire.headers["ce_type"] == TYPE.encode()
    assert wire.headers["content-type"] == b"application/json"
    assert "ce_datacontenttype" not in wire.headers
    assert ("ce_partitionkey" in wire.headers) == (key is not None)
    parsed = kafka.from_kafka(wire, FORMAT)
    assert_parsed(parsed, event, key)
    assert json.loads(record.value) == {"order": "o-9", "items": 5, "note": "fragile"}


async def test_kafka_header_values_travel_as_utf8_and_the_sdk_reads_them_back(
    kafka_clients: KafkaClients, topic: str
) -> None:
    """No percent-encoding on Kafka (that is the HTTP binding's): a value with a line break,
    spaces, a percent sign and a letter beyond ASCII is its UTF-8 bytes."""
    event, metadata = published_event()
    address = "1 Main St\nSpringfield 100% \u00fcber"
    metadata["address"] = address
    await kafka_clients.broker.publish(topic, event, key=KEY, metadata=metadata)
    record = await read_raw(kafka_clients.servers, topic)
    wire = kafka_wire(record)
    assert wire.headers["ce_address"] == address.encode()
    parsed = kafka.from_binary(wire, FORMAT)
    assert_parsed(parsed, event, KEY)
    assert parsed.get_extension("address") == address


async def test_kafka_records_that_are_no_cloudevent_are_dead_lettered_and_the_consumer_goes_on(
    kafka_clients: KafkaClients, topic: str
) -> None:
    ce = sdk_event(None)
    not_ce = json.dumps({"order": "o-7", "items": 3}).encode()
    no_specversion = kafka.to_binary(ce, FORMAT).headers.copy()
    del no_specversion["ce_specversion"]
    no_specversion["ce_type"] = b"test.interop.unversioned"
    bad = [
        KafkaMessage(headers={}, key=None, value=b"plain text"),  # no headers at all
        KafkaMessage(headers={"content-type": b"application/json"}, key=None, value=not_ce),
        KafkaMessage(  # structured, but cut short
            headers={"content-type": b"application/cloudevents+json"},
            key=None,
            value=b'{"specversion": "1.0", "id": "cut-short',
        ),
        KafkaMessage(headers=no_specversion, key=None, value=b"unversioned"),
    ]

    async def publish() -> None:
        # One partition, the good record last: the consumer has to get past the bad ones.
        for wire in bad:
            await kafka_send(kafka_clients.producer, topic, wire, partition=0)
        await kafka_clients.producer.send_and_wait(topic, None, key=b"gone", partition=0)
        await kafka_send(kafka_clients.producer, topic, kafka_message(ce, "binary"), partition=0)

    handled, letters = await consume(kafka_clients.broker, topic, publish, dead=5)
    assert_handled(handled, ce, None)
    assert len(letters) == 5
    assert_invalid(
        letters, topic, "plain text", '"order": "o-7"', "cut-short", "test.interop.unversioned"
    )
    [tombstone] = [letter for letter in letters if letter.message.key == "gone"]
    assert tombstone.message.data == b""
