"""Brokers, chosen by URL: `open_broker("memory://")`, `"redis://…"`, `"amqp://…"`, `"nats://…"`,
`"sqs://…"` (SNS+SQS), `"eventbridge://…"` and `"kafka://…"`.

Adapters are imported only when their scheme is used, so `import tidings` loads no client.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any
from urllib.parse import urlsplit

from tidings.brokers.base import Broker, BrokerBase, DeadLetter, DeadLetterNotFound, Delivery
from tidings.brokers.envelope import Message
from tidings.core.errors import ConfigurationError

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

# scheme -> (module, class, client module, extra that installs it)
BACKENDS: dict[str, tuple[str, str, str | None, str | None]] = {
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
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise ConfigurationError(f"unknown broker URL {url!r}; known schemes: {known}")
    module_name, class_name, client, extra = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if client is not None and importlib.util.find_spec(client) is None:
            raise ConfigurationError(
                f'{scheme}:// needs the {client} client: pip install "tidings[{extra}]"'
            ) from None
        if exc.name == module_name:
            raise ConfigurationError(f"{scheme}:// is not built yet") from None
        raise
    broker: BrokerBase = getattr(module, class_name).from_url(url, **options)
    return broker
