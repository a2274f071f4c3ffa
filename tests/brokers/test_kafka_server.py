"""Kafka errors a user meets first, against the Kafka the tests use (a Tansu broker they
start, or `TIDINGS_TEST_KAFKA`): each is one clear `KafkaBrokerError` naming the broker and
the cause, and nothing that was refused is acknowledged or delivered."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import tidings
from tests.backends import KAFKA, free_port, kafka_url, require
from tidings.brokers import open_broker
from tidings.brokers.kafka import KafkaBrokerError
from tidings.core.errors import ConfigurationError


class Note(tidings.Event, type="test.kafka.server.note"):
    text: str


async def test_a_cluster_that_refuses_producer_ids_names_the_way_out() -> None:
    """The idempotent producer is the default; Tansu, like a cluster without the
    IdempotentWrite ACL, refuses InitProducerId, and the error says which option opts out."""
    require("kafka")
    url = kafka_url(idempotence="true")
    if KAFKA:  # a real cluster allows it: the default opens
        async with open_broker(url):
            return
    with pytest.raises(KafkaBrokerError) as caught:
        async with open_broker(url):
            pass
    message = str(caught.value)
    address = url.split("://", 1)[1].split("?", 1)[0]
    assert f"Kafka at {address} refused an idempotent producer" in message
    assert f"kafka://{address}?idempotence=false" in message
    assert "written twice" in message  # what opting out costs


@pytest.mark.parametrize(
    "address", ["127.0.0.1:{port}", "no-such-host.invalid:9092"], ids=["refused", "unknown"]
)
async def test_a_broker_nobody_answers_for_is_one_clear_error(address: str) -> None:
    address = address.format(port=free_port())
    with pytest.raises(KafkaBrokerError) as caught:
        async with asyncio.timeout(20):
            async with open_broker(f"kafka://{address}?connect_timeout=3&idempotence=false"):
                pass
    message = str(caught.value)
    assert message.startswith(f"cannot connect to Kafka at {address}: "), message
    assert "no broker answered" in message
    assert "\n" not in message


@pytest.mark.parametrize("topic", ["orders/eu", "orders:eu", ".", "x" * 250, "ordres eu"])
async def test_a_topic_name_kafka_forbids_is_refused_before_anything_is_sent(topic: str) -> None:
    require("kafka")
    async with open_broker(kafka_url()) as broker:
        with pytest.raises(ConfigurationError, match=r"topic .*letters, digits"):
            await broker.publish(topic, Note(text="x"))
        with pytest.raises(ConfigurationError, match=r"topic .*letters, digits"):
            await broker.declare(topic, "g")


async def test_an_oversized_message_is_refused_and_never_delivered() -> None:
    """Over the producer's request limit (Kafka's 1 MB `max.message.bytes` by default): the
    publish raises naming the topic, the broker and the size, and the group gets only what
    was written."""
    require("kafka")
    topic = f"t-{uuid.uuid4().hex[:10]}"
    async with open_broker(kafka_url()) as broker:
        await broker.declare(topic, "g")
        with pytest.raises(KafkaBrokerError) as caught:
            await broker.publish(topic, Note(text="x" * (2 * 1024 * 1024)))
        message = str(caught.value)
        assert f"cannot publish to {topic!r} on Kafka at " in message
        assert "MessageSizeTooLargeError" in message and "bytes" in message
        await broker.publish(topic, Note(text="small"))
        async with broker.subscribe(topic, group="g") as deliveries:
            delivery = await asyncio.wait_for(anext(aiter(deliveries)), 15)
            assert delivery.event.text == "small"  # type: ignore[attr-defined]
            await delivery.ack()
            with pytest.raises(TimeoutError):  # nothing else: the refused one was not written
                await asyncio.wait_for(anext(aiter(deliveries)), 2)
