"""`NATSBroker`: the broker on NATS JetStream (`nats://host:4222`), on nats-py; the design is
in docs/brokers.md ("NATS JetStream, in detail"). Needs nats-server 2.9 or later with
JetStream enabled.

- `broker.py`: the URL and options, connecting, publishing, receiving through members,
  dead letters.
- `topology.py`: the streams, each group's durable consumers (one per lane), the subjects.
- `member.py`: one member's pull requests, handing out, keeping alive, settling (ack, NAK,
  TERM), giving back what it held when it leaves.
- `records.py`: messages as NATS headers and body, and a delivery's numbers (no I/O).
- `errors.py`: which nats-py failures become a `BrokerError`, and how they read.
"""

from __future__ import annotations

from tidings.brokers.nats.broker import NATSBroker
from tidings.brokers.nats.records import _wire as _wire

__all__ = ["NATSBroker"]
