"""`SQSBroker` (SNS topics fanning out to SQS queues, `sqs://?region=…`) and
`EventBridgeBroker` (an event bus with a rule per group, `eventbridge://?region=…`), on
aiobotocore; the design is in docs/brokers.md.

- `broker.py`: the URL and options, the clients, publishing, groups, dead letters.
- `eventbridge.py`: `EventBridgeBroker`: publishing to a bus, a rule per group.
- `member.py`: one member of a group: receiving, handing out in key order, visibility
  heartbeats, ack and nack, leaving.
- `topology.py`: creating topics, queues (with their dead-letter queues), policies,
  subscriptions and the dead-letter bucket.
- `records.py`: messages as SQS, SNS and EventBridge bodies and back (no I/O).
- `errors.py`: botocore's and aiohttp's failures as one `SQSBrokerError`.
"""

from __future__ import annotations

from tidings.brokers.sqs.broker import SQSBroker
from tidings.brokers.sqs.errors import SQSBrokerError
from tidings.brokers.sqs.eventbridge import EventBridgeBroker

__all__ = ["EventBridgeBroker", "SQSBroker", "SQSBrokerError"]
