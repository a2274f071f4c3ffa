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

# The bookkeeping the unit tests reach for, re-exported; not part of the public API.
from tidings.brokers.kafka.member import _BUFFER as _BUFFER
from tidings.brokers.kafka.member import _Consumer as _Consumer
from tidings.brokers.kafka.member import _Partition as _Partition
from tidings.brokers.kafka.offsets import OffsetTracker as OffsetTracker
from tidings.brokers.kafka.records import _COUNTS_MAX as _COUNTS_MAX
from tidings.brokers.kafka.records import apply_dead_letter as apply_dead_letter
from tidings.brokers.kafka.records import dead_letter_value as dead_letter_value
from tidings.brokers.kafka.records import decode_attempts as decode_attempts
from tidings.brokers.kafka.records import encode_attempts as encode_attempts
from tidings.brokers.kafka.records import from_record as from_record
from tidings.brokers.kafka.records import to_record as to_record

__all__ = ["KafkaBroker", "KafkaBrokerError"]
