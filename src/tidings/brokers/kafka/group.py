"""A member in its consumer group: told of rebalances (`_Listener`), and leaving even at
generation 0, which aiokafka skips."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]
from aiokafka.protocol.group import LeaveGroupRequest  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from tidings.brokers.kafka.member import _Consumer


async def _leave_generation_zero(consumer: Any) -> None:
    """Send LeaveGroup for a member of generation 0, which aiokafka's `stop` skips.

    Apache Kafka numbers a group's first generation 1, and aiokafka leaves only from
    generation 1 on; some Kafka-protocol brokers (Tansu) start at 0, so without this a member
    that leaves stays in the group until its session times out, and the group's next
    rebalance waits for it."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "generation", None) != 0:
        return
    if not coordinator.member_id or coordinator.coordinator_id is None:
        return
    with contextlib.suppress(KafkaError):
        await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells a member when Kafka takes its partitions away (or gives it new ones)."""

    def __init__(self, member: _Consumer) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.member.revoke()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.member.wake()  # the records come with the next fetch
