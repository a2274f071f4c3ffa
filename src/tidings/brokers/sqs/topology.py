"""Creating what the broker runs on: SNS topics, SQS queues with their dead-letter queues,
policies and subscriptions, and the dead-letter bucket."""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

import botocore.exceptions  # type: ignore[import-untyped]

from tidings.brokers.sqs.errors import _FAILURES, SQSBrokerError, _code, _describe

if TYPE_CHECKING:
    from tidings.brokers.sqs.broker import SQSBroker


async def _topic(broker: SQSBroker, topic: str) -> str:
    """The topic's SNS FIFO topic ARN (created once: CreateTopic is idempotent)."""
    arn = broker._topics.get(topic)
    if arn is None:
        reply = await broker._call(
            "sns",
            "create_topic",
            f"create the topic {topic!r}",
            Name=f"{broker.prefix}-{_readable(topic, 180)}-{_digest(topic)}.fifo",
            Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"},
        )
        arn = broker._topics[topic] = str(reply["TopicArn"])
    return arn


def _queue_name(broker: SQSBroker, topic: str, group: str, kind: str = "") -> str:
    stem = f"{broker.prefix}-{kind}{_digest(topic)[:8]}{_digest(topic, group)[:8]}-"
    return stem + _readable(f"{topic}-{group}", 75 - len(stem)) + ".fifo"


async def _queue(broker: SQSBroker, topic: str, group: str) -> str:
    """The group's queue URL, creating queue, dead-letter queue and route once."""
    url = broker._queues.get((topic, group))
    if url is not None:
        return url
    what = f"declare group {group!r} on {topic!r}"
    tags = {"tidings:topic": topic, "tidings:group": group}
    dlq_url = await _create_queue(
        broker,
        _queue_name(broker, topic, group, "dlq-"),
        {"FifoQueue": "true", "MessageRetentionPeriod": "1209600"},
        tags,
        what,
    )
    dlq_arn = await _queue_arn(broker, dlq_url, what)
    name = _queue_name(broker, topic, group)
    arn = f"arn:{broker._partition}:sqs:{broker.region}:{broker._account}:{name}"
    source = await broker._route_source(topic, group)
    attributes = {
        "FifoQueue": "true",
        "ContentBasedDeduplication": "true",
        "VisibilityTimeout": str(broker.visibility_timeout),
        "RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": broker.max_receives}
        ),
        "Policy": json.dumps(_policy(arn, *source)),
    }
    url = await _create_queue(broker, name, attributes, tags, what)
    await broker._route(topic, group, await _queue_arn(broker, url, what))
    broker._queues[topic, group] = url
    return url


async def _create_queue(
    broker: SQSBroker, name: str, attributes: dict[str, str], tags: dict[str, str], what: str
) -> str:
    try:
        reply = await broker._clients["sqs"].create_queue(
            QueueName=name, Attributes=attributes, tags=tags
        )
    except botocore.exceptions.ClientError as exc:
        if _code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
            raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
        # It exists with other attributes (another client's options): use it as it is.
        reply = await broker._call("sqs", "get_queue_url", what, QueueName=name)
    except _FAILURES as exc:
        raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
    return str(reply["QueueUrl"])


async def _queue_arn(broker: SQSBroker, url: str, what: str) -> str:
    reply = await broker._call(
        "sqs", "get_queue_attributes", what, QueueUrl=url, AttributeNames=["QueueArn"]
    )
    return str(reply["Attributes"]["QueueArn"])


async def _ensure_bucket(broker: SQSBroker, what: str) -> None:
    request: dict[str, Any] = {"Bucket": broker.bucket}
    if broker.region != "us-east-1":
        request["CreateBucketConfiguration"] = {"LocationConstraint": broker.region}
    try:
        await broker._clients["s3"].create_bucket(**request)
    except botocore.exceptions.ClientError as exc:
        if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
    except _FAILURES as exc:
        raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
    broker._bucket_ready = True


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _readable(name: str, size: int) -> str:
    """`name` as AWS names allow it (letters, digits, `-`, `_`), at most `size` long."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[: max(0, size)]


def _policy(queue_arn: str, service: str, source_arn: str) -> dict[str, Any]:
    """A queue policy letting the topic (or rule) send to the queue."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "tidings-route",
                "Effect": "Allow",
                "Principal": {"Service": service},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": source_arn}},
            }
        ],
    }
