"""`KafkaBroker`: the broker on Apache Kafka (`kafka://host:9092[,host:9092]?partitions=8`),
on aiokafka; the design is in docs/brokers.md.

- `broker.py`: the URL and options, the clients, publishing, topics and groups, dead letters.
- `member.py`: one member of a consumer group: fetching, handing out in key order,
  committing, counting deliveries ahead, handing over on a rebalance.
- `table.py`: a compacted topic read as a map (dead letters, delivery counts).
- `records.py`: messages as Kafka records and back, and the values of those tables (no I/O).
- `offsets.py`: a partition's commit point (no I/O).
- `errors.py`: aiokafka's failures as one `KafkaBrokerError`.
"""

from __future__ import annotations

from tidings.brokers.kafka.broker import KafkaBroker
from tidings.brokers.kafka.errors import KafkaBrokerError
from tidings.brokers.kafka.member import _BUFFER, _Consumer, _Partition
from tidings.brokers.kafka.offsets import OffsetTracker
from tidings.brokers.kafka.records import (
    _COUNTS_MAX,
    apply_dead_letter,
    dead_letter_value,
    decode_attempts,
    encode_attempts,
    from_record,
    to_record,
)

__all__ = ["KafkaBroker", "KafkaBrokerError"]

# The bookkeeping the unit tests reach for; not part of the public API.
_internals = (
    _BUFFER,
    _COUNTS_MAX,
    _Consumer,
    _Partition,
    OffsetTracker,
    apply_dead_letter,
    dead_letter_value,
    decode_attempts,
    encode_attempts,
    from_record,
    to_record,
)
