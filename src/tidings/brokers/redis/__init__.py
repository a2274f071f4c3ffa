"""`RedisBroker`: the broker on Redis Streams and consumer groups
(`redis://host:port/db?shards=8`); the design is in docs/brokers.md ("Redis Streams, in detail").

- `broker.py`: the URL and options, the client, publishing, declaring groups, dead letters.
- `member.py`: one member of a group: receiving, handing out in key order, ack and nack,
  leaving.
- `leases.py`: shard ownership: lease keys, fair shares, taking shards over and handing
  them back, claiming the keyless entries other members left.
- `records.py`: messages as stream entries and back, entry ids (no I/O).
- `errors.py`: `RedisBrokerError`, and which failures mean the link is down.
"""

from __future__ import annotations

from tidings.brokers.redis.broker import RedisBroker
from tidings.brokers.redis.errors import RedisBrokerError
from tidings.brokers.redis.records import _fields as _fields

__all__ = ["RedisBroker", "RedisBrokerError"]
