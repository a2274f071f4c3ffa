"""`RabbitMQBroker`: the broker on RabbitMQ 3.10+ quorum queues (`amqp://host:5672/vhost`),
on aio-pika; the design is in docs/brokers.md ("RabbitMQ, in detail").

- `broker.py`: the URL and options, the connection and its admin channel, publishing with
  publisher confirms, members joining and leaving, dead letters.
- `member.py`: one member of a group: consuming every queue of the group, handing out in key
  order, acking and nacking.
- `shards.py`: members sharing the shard queues out, giving away the ones over their share.
- `topology.py`: the names of exchanges and queues, declaring them, which shard a key goes to.
- `records.py`: messages as AMQP messages and back, and the dead-letter records (no I/O).
- `errors.py`: the link failures as one `RabbitMQBrokerError`; closing what may be gone.
"""

from __future__ import annotations

from tidings.brokers.rabbitmq.broker import RabbitMQBroker
from tidings.brokers.rabbitmq.errors import RabbitMQBrokerError
from tidings.brokers.rabbitmq.records import MAX_HEADERS_SIZE as MAX_HEADERS_SIZE
from tidings.brokers.rabbitmq.topology import DLQ as DLQ
from tidings.brokers.rabbitmq.topology import DLQ_LOCK as DLQ_LOCK
from tidings.brokers.rabbitmq.topology import DLX as DLX
from tidings.brokers.rabbitmq.topology import _name as _name

__all__ = ["RabbitMQBroker", "RabbitMQBrokerError"]
