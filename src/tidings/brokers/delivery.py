"""What a consumer gets: `Received` (an adapter's message with its ack and nack) wrapped
in a `Delivery` (decoding, settling once, dead-lettering)."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tidings import telemetry
from tidings.brokers.dead_letters import DeadLetter
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.events import Event
from tidings.core.metadata import Metadata
from tidings.core.recorded import RecordedEvent

if TYPE_CHECKING:
    from tidings.brokers.base import BrokerBase

__all__ = ["Delivery", "Received"]


class Received(ABC):
    """A message as an adapter hands it out, with the adapter's own ack and nack."""

    def __init__(self, message: Message, attempt: int) -> None:
        self.message = message
        self.attempt = attempt  # 1 on the first delivery; the broker's count after redeliveries

    @abstractmethod
    async def ack(self) -> None:
        """Done: never deliver it to this group again."""

    @abstractmethod
    async def nack(self, delay: float | None) -> None:
        """Not done: deliver it again (to any member of the group) after `delay` seconds."""

    async def terminate(self) -> None:
        """Given up on (it is a dead letter now): never deliver it again. Brokers with a verb
        for that (JetStream's `term`) say so; the others ack."""
        await self.ack()


class Delivery:
    """One message delivered to one member of a group; ack it, nack it, or dead-letter it."""

    def __init__(
        self,
        broker: BrokerBase,
        group: str,
        received: Received,
        codec: JSONCodec | None = None,
    ) -> None:
        self.broker = broker
        self.codec = codec or broker.codec
        self.group = group
        self.received = received
        self.message = received.message
        self.settled = False
        self._record: RecordedEvent[Any] | None = None

    @property
    def topic(self) -> str:
        """The topic it was published to."""
        return self.message.topic

    @property
    def key(self) -> str | None:
        """Its ordering key (a relay's: the stream id); None for a keyless message."""
        return self.message.key

    @property
    def attempt(self) -> int:
        """1 on the first delivery to this group, more after redeliveries."""
        return self.received.attempt

    @property
    def record(self) -> RecordedEvent[Any]:
        """The decoded event with id, type, time and metadata; raises if it does not decode
        (`InvalidCloudEvent`, `UnknownEventType`, `EventDecodeError`)."""
        if self._record is None:
            self._record = self.message.record(self.codec)
        return self._record

    @property
    def event(self) -> Event:
        """The typed event (see `record`)."""
        event: Event = self.record.event
        return event

    @property
    def metadata(self) -> Metadata:
        """The event's correlation and causation ids and headers (see `record`)."""
        return self.record.metadata

    async def ack(self) -> None:
        """Processed: the group will not see it again."""
        self._settle()
        await self.received.ack()

    async def nack(self, delay: float | None = None) -> None:
        """Not processed: the broker delivers it again after `delay` seconds (default now)."""
        self._settle()
        await self.received.nack(delay)

    async def dead_letter(self, error: str, *, attempts: int | None = None) -> DeadLetter:
        """Give up on it: keep it with `error` and the number of `attempts` made (default:
        the deliveries so far) among the dead letters, then tell the broker it is finished."""
        self._settle()
        dead = DeadLetter(
            str(uuid.uuid4()),
            self.topic,
            self.group,
            error,
            self.attempt if attempts is None else attempts,
            datetime.now(UTC),
            self.message,
        )
        await self.broker._add_dead_letter(dead)
        await self.received.terminate()
        telemetry.dead_lettered(self, error)
        return dead

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError(f"delivery {self.message.id} was already acked or nacked")
        self.settled = True


@dataclass
class _Member:
    broker: BrokerBase
    topic: str
    group: str
    prefetch: int
    codec: JSONCodec
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    async def deliveries(self) -> AsyncIterator[Delivery]:
        await self.broker._declare(self.topic, self.group)
        async for received in self.broker._receive(
            self.topic, self.group, self.name, self.prefetch
        ):
            yield Delivery(self.broker, self.group, received, self.codec)

    async def close(self) -> None:
        if not self.broker._closed:
            await self.broker._leave(self.topic, self.group, self.name)
