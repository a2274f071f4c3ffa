"""Brokers, chosen by URL: `open_broker("memory://")`, `"redis://…"`, `"amqp://…"`, `"nats://…"`,
`"sqs://…"` (SNS+SQS), `"eventbridge://…"` and `"kafka://…"`.

Adapters are imported only when their scheme is used, so `import tidings` loads no client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tidings.brokers.base import Broker, BrokerBase, DeadLetter, DeadLetterNotFound, Delivery
from tidings.brokers.envelope import Message
from tidings.core.urls import Backends, backend_class

__all__ = [
    "BACKENDS",
    "Broker",
    "BrokerBase",
    "DeadLetter",
    "DeadLetterNotFound",
    "Delivery",
    "Message",
    "open_broker",
]

BACKENDS: Backends = {
    "memory": ("tidings.brokers.memory", "MemoryBroker", None, None),
    "redis": ("tidings.brokers.redis", "RedisBroker", "redis", "redis"),
    "amqp": ("tidings.brokers.rabbitmq", "RabbitMQBroker", "aio_pika", "rabbitmq"),
    "nats": ("tidings.brokers.nats", "NATSBroker", "nats", "nats"),
    "sqs": ("tidings.brokers.sqs", "SQSBroker", "aiobotocore", "aws"),  # SNS topics + SQS queues
    "eventbridge": ("tidings.brokers.sqs", "EventBridgeBroker", "aiobotocore", "aws"),
    "kafka": ("tidings.brokers.kafka", "KafkaBroker", "aiokafka", "kafka"),
}


def open_broker(url: str, **options: Any) -> BrokerBase:
    """The broker for `url`, ready for `async with` (or `await broker.open()`)."""
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    cls = backend_class(
        BACKENDS, scheme, unknown=f"unknown broker URL {url!r}; known schemes: ", needs="client"
    )
    broker: BrokerBase = cls.from_url(url, **options)
    return broker
