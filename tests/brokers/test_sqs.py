"""SNS+SQS and EventBridge behaviour the conformance suite cannot state for every broker:
URL options, the FIFO topics and queues with their redrive policy, the EventBridge rule,
SQS's own dead letters, and a bounded publish when AWS is gone (on moto)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiobotocore.session import AioSession

import tidings
from tests.backends import broker_url, require, start_moto, stop_moto
from tidings.brokers import open_broker
from tidings.brokers.sqs import EventBridgeBroker, SQSBroker, SQSBrokerError
from tidings.core.errors import BrokerError, ConfigurationError


class Parcel(tidings.Event, type="test.sqs.parcel"):
    n: int


AWS = ("sqs", "eventbridge")


def with_query(url: str, extra: str) -> str:
    return f"{url}&{extra}"


async def client(url: str, service: str) -> Any:
    """An aiobotocore client on the same endpoint as the broker at `url`."""
    broker = open_broker(url)
    assert isinstance(broker, SQSBroker)
    return AioSession().create_client(
        service,
        region_name="us-east-1",
        endpoint_url=broker.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# -- URL options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqs://?shards=4", "unknown option 'shards'"),
        ("sqs://?wait_time=soon", "wait_time='soon'.* not a valid int"),
        ("sqs://?wait_time=21", "wait_time must be 0-20"),
        ("sqs://?visibility_timeout=0", "visibility_timeout must be 1-43200"),
        ("sqs://?max_receives=0", "max_receives must be 1-1000"),
        ("sqs://?prefix=Has_Upper", "prefix 'Has_Upper'"),
        ("sqs://?bucket=No", "bucket 'No' is not a valid S3 bucket name"),
        ("sqs://?access_key_id=x", "access_key_id and secret_access_key together"),
        ("sqs://?endpoint_url=127.0.0.1:4566", "endpoint_url must be an http"),
        ("sqs://us-east-1", "put the endpoint and region in the query"),
        ("eventbridge://?bus=a/b", "bus 'a/b'"),
        ("eventbridge://?poll_interval=0", "poll_interval and connect_timeout must be positive"),
    ],
)
def test_bad_options_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_broker(url)


def test_options_are_read_from_the_url() -> None:
    broker = open_broker(
        "eventbridge://?endpoint_url=http://127.0.0.1:5000&region=eu-west-1&prefix=app"
        "&visibility_timeout=60&wait_time=0&max_receives=5&bus=orders"
    )
    assert isinstance(broker, EventBridgeBroker)
    assert (broker.endpoint_url, broker.region, broker.prefix, broker.bus) == (
        "http://127.0.0.1:5000",
        "eu-west-1",
        "app",
        "orders",
    )
    assert (broker.visibility_timeout, broker.wait_time, broker.max_receives) == (60, 0, 5)
    assert open_broker("sqs://?prefix=app").bucket is None  # type: ignore[attr-defined]


# -- what declaring creates -----------------------------------------------------------------


@pytest.fixture(params=AWS)
async def aws(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    require(request.param)
    yield broker_url(request.param)


async def test_a_group_is_a_fifo_queue_with_a_redrive_policy_and_its_route(aws: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    async with open_broker(with_query(aws, "max_receives=7")) as broker:
        assert isinstance(broker, SQSBroker)
        await broker.declare(topic, "billing.v2")
        queue_url = broker._queues[topic, "billing.v2"]
    async with await client(aws, "sqs") as sqs:
        attributes = (await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"]))[
            "Attributes"
        ]
        assert attributes["FifoQueue"] == "true"
        redrive = json.loads(attributes["RedrivePolicy"])
        assert int(redrive["maxReceiveCount"]) == 7
        assert redrive["deadLetterTargetArn"].endswith(".fifo")
        assert json.loads(attributes["Policy"])["Statement"][0]["Action"] == "sqs:SendMessage"
        tags = (await sqs.list_queue_tags(QueueUrl=queue_url))["Tags"]
        assert tags == {"tidings:topic": topic, "tidings:group": "billing.v2"}
    if isinstance(broker, EventBridgeBroker):
        async with await client(aws, "events") as events:
            name = broker._rule_name(topic, "billing.v2")
            rule = await events.describe_rule(Name=name, EventBusName=broker.bus)
            assert json.loads(rule["EventPattern"]) == {"detail": {"tidingstopic": [topic]}}
            [target] = (await events.list_targets_by_rule(Rule=name, EventBusName=broker.bus))[
                "Targets"
            ]
            assert target["Arn"] == attributes["QueueArn"]
            assert target["SqsParameters"] == {"MessageGroupId": "tidings"}
    else:
        async with await client(aws, "sns") as sns:
            arn = broker._topics[topic]
            assert arn.endswith(".fifo")
            topic_attributes = (await sns.get_topic_attributes(TopicArn=arn))["Attributes"]
            assert topic_attributes["FifoTopic"] == "true"
            [subscription] = (await sns.list_subscriptions_by_topic(TopicArn=arn))["Subscriptions"]
            assert subscription["Endpoint"] == attributes["QueueArn"]
            details = await sns.get_subscription_attributes(
                SubscriptionArn=subscription["SubscriptionArn"]
            )
            assert details["Attributes"]["RawMessageDelivery"] == "true"


async def test_keys_sqs_would_refuse_as_group_ids_still_arrive(aws: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    keys = ["client 42 / été", "x" * 300]
    async with open_broker(aws) as broker:
        await broker.declare(topic, "g")
        for n, key in enumerate(keys):
            await broker.publish(topic, Parcel(n=n), key=key)
        got = []
        async with broker.subscribe(topic, group="g") as deliveries:
            async with asyncio.timeout(10):
                async for delivery in deliveries:
                    got.append((delivery.key, delivery.event.n))  # type: ignore[attr-defined]
                    await delivery.ack()
                    if len(got) == len(keys):
                        break
    assert sorted(got) == sorted(zip(keys, range(len(keys)), strict=True))


# -- SQS's own dead letters -----------------------------------------------------------------


async def test_what_sqs_redrives_is_listed_as_a_dead_letter_and_replays(aws: str) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    async with open_broker(with_query(aws, "max_receives=1")) as broker:
        await broker.declare(topic, "g")
        await broker.publish(topic, Parcel(n=5))
        async with broker.subscribe(topic, group="g") as deliveries:
            async with asyncio.timeout(10):
                await anext(aiter(deliveries))  # taken, never settled: it goes back on leaving
        async with broker.subscribe(topic, group="g") as deliveries:
            with pytest.raises(TimeoutError):  # SQS moves it to the dead-letter queue instead
                async with asyncio.timeout(1.0):
                    await anext(aiter(deliveries))
        [dead] = await broker.dead_letters(topic)
        assert dead.error.startswith("SQS moved it to its dead-letter queue after 1 receives")
        assert (dead.group, dead.attempts) == ("g", 1)
        assert dead.message.record(broker.codec).event == Parcel(n=5)
        assert await broker.dead_letters(topic) == [dead]  # adopted once
        await broker.replay(dead.id)
        async with broker.subscribe(topic, group="g") as deliveries:
            async with asyncio.timeout(10):
                again = await anext(aiter(deliveries))
            assert again.event == Parcel(n=5)
            await again.ack()
        assert await broker.dead_letters(topic) == []


# -- AWS unreachable ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", AWS)
async def test_publishing_when_aws_is_gone_raises_a_broker_error_in_bounded_time(
    scheme: str,
) -> None:
    require(scheme)
    server = start_moto()
    if isinstance(server, str):
        pytest.fail(server)
    try:
        port = server.args[-1]
        url = (
            f"{scheme}://?endpoint_url=http://127.0.0.1:{port}&region=us-east-1"
            "&access_key_id=testing&secret_access_key=testing&connect_timeout=1"
            "&publish_attempts=2&wait_time=0"
        )
        async with open_broker(url) as broker:
            await broker.declare("gone", "g")
            stop_moto(server)
            started = time.monotonic()
            with pytest.raises(SQSBrokerError, match="cannot publish to 'gone'"):
                await broker.publish("gone", Parcel(n=1))
            assert time.monotonic() - started < 10
        with pytest.raises(BrokerError, match="cannot reach AWS"):
            async with open_broker(url):
                pass
    finally:
        stop_moto(server)
