"""The `Broker` protocol, deliveries and dead letters, and what every adapter shares.

An adapter subclasses `BrokerBase` and implements a few primitives: publish messages
durably, hand out `Received` messages of a topic to the members of a group (competing, one
key in publish order), take acks and delayed nacks, and keep dead letters. Encoding,
decoding, validation and the dead-letter records live here, so every broker behaves alike.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from tidings import telemetry
from tidings.brokers.envelope import Message, encode
from tidings.core.codec import JSONCodec
from tidings.core.context import with_correlation
from tidings.core.errors import ConfigurationError, NotAnEvent, StoreClosed, TidingsError
from tidings.core.events import Event
from tidings.core.lifecycle import AsyncResource
from tidings.core.metadata import Metadata, MetadataLike
from tidings.core.recorded import RecordedEvent

__all__ = ["Broker", "BrokerBase", "DeadLetter", "Delivery", "Received"]


class _Queued(Protocol):
    """What `next_in_key_order` reads of an adapter's queued entry."""

    @property
    def message(self) -> Message: ...
    @property
    def not_before(self) -> float: ...  # when a nacked message may go again
    @property
    def holder(self) -> object: ...  # falsy while nobody has it


E = TypeVar("E", bound=_Queued)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(kind: str, name: object) -> str:
    """A topic or group name every broker can use: letters, digits, `.`, `_`, `-`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{kind} {name!r}: use 1-200 letters, digits, '.', '_' or '-' (not first)"
        )
    return name


class Received(ABC):
    """A message as an adapter hands it out, with the adapter's own ack and nack."""

    message: Message
    attempt: int  # 1 on the first delivery; the broker's count after redeliveries

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


def next_in_key_order(entries: Iterable[E], now: float) -> tuple[E | None, float | None]:
    """The first entry that may go out now, and when to look again if none.

    `entries` are in publish order, each with a `message`, a `not_before` time and a
    `holder` (falsy when nobody has it). An entry waits while an earlier one of its key is
    held or waiting for a retry, so one key goes out in order and never twice at once.
    """
    blocked: set[str] = set()
    soonest: float | None = None
    for entry in entries:
        key = entry.message.key
        if key is not None and key in blocked:
            continue
        if not entry.holder:
            if entry.not_before <= now:
                return entry, None
            soonest = entry.not_before if soonest is None else min(soonest, entry.not_before)
        if key is not None:
            blocked.add(key)  # in flight or waiting: later ones of this key wait too
    return None, soonest


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on: why, after how many attempts, and the original."""

    id: str
    topic: str
    group: str
    error: str
    attempts: int
    failed_at: datetime
    message: Message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: what the CLI prints and what adapters store (`from_dict` reads
        it back). Data that is not UTF-8 is kept as `data_base64`."""
        record: dict[str, Any] = {
            "id": self.id,
            "topic": self.topic,
            "group": self.group,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat(),
            "key": self.message.key,
            "attributes": dict(self.message.attributes),
            "headers": dict(self.message.headers),
        }
        try:
            record["data"] = self.message.data.decode("utf-8")
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(self.message.data).decode("ascii")
        return record

    def to_json(self, limit: int | None = None, *, limit_name: str = "the limit") -> bytes:
        """`to_dict` as UTF-8 JSON, within `limit` bytes when given (a broker's largest
        record). A message too large to keep whole (one just under the limit grows as JSON)
        is kept cut: its data, error, attribute and header values shortened until the record
        fits, and the error says so. It is still dead-lettered, instead of failing its
        consumer over and over."""
        body = json.dumps(self.to_dict(), ensure_ascii=False, default=str).encode()
        if limit is None:
            return body
        size, room, count = len(body), limit // 8, 64
        note = f" [cut from {size:,} bytes to fit {limit_name} of {limit:,}]"
        while len(body) > limit and room:
            message = self.message
            smaller = DeadLetter(
                self.id,
                self.topic,
                self.group,
                self.error[:room] + note,
                self.attempts,
                self.failed_at,
                Message(
                    message.topic,
                    _cut(message.attributes, room, count),
                    message.data[:room],
                    message.key and message.key[:room],
                    _cut(message.headers, room, count),
                ),
            )
            body = json.dumps(smaller.to_dict(), ensure_ascii=False, default=str).encode()
            room, count = room // 2, count // 2
        return body

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> DeadLetter:
        """The dead letter `to_dict` described."""
        if "data_base64" in record:
            data = base64.b64decode(record["data_base64"])
        else:
            data = str(record.get("data", "")).encode()
        message = Message(
            record["topic"],
            dict(record.get("attributes") or {}),
            data,
            record.get("key"),
            dict(record.get("headers") or {}),
        )
        return cls(
            str(record["id"]),
            record["topic"],
            record["group"],
            str(record["error"]),
            int(record["attempts"]),
            datetime.fromisoformat(record["failed_at"]),
            message,
        )


def _cut(values: Mapping[str, Any], room: int, count: int) -> dict[str, Any]:
    """The first `count` entries, names cut to 64 characters and text values to `room`."""
    return {
        str(k)[:64]: v[:room] if isinstance(v, str) else v for k, v in list(values.items())[:count]
    }


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


@runtime_checkable
class Broker(Protocol):
    """Routes events from publishers to consumer groups; see docs/brokers.md."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(
        self,
        topic: str,
        event: Event,
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None: ...

    async def publish_many(
        self,
        topic: str,
        events: Iterable[Event],
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None: ...

    def subscribe(self, topic: str, *, group: str) -> Any: ...

    async def dead_letters(self, topic: str | None = None) -> list[DeadLetter]: ...

    async def replay(self, dead_letter_id: str) -> DeadLetter: ...


class BrokerBase(AsyncResource, ABC):
    """Shared behaviour of the broker adapters; see `Broker`."""

    #: The CloudEvents header prefix of this broker's binding (binary mode).
    header_prefix = "ce-"

    def __init__(self, *, codec: JSONCodec | None = None, source: str = "tidings") -> None:
        self.codec = codec or JSONCodec()
        self.source = source
        self._opened = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Self:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} was closed; open a new one")
        if not self._opened:
            self.codec.registry.check()  # a gap in an upcaster chain fails here, at start-up
            await self._open()
            self._opened = True
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opened:
            await self._close()

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise StoreClosed(f"{type(self).__name__} is not open")

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        event: Event,
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        """Publish one event; returns once the broker has it durably. Events with the same
        `key` reach each group in publish order."""
        await self.publish_many(topic, [event], key=key, metadata=metadata)

    async def publish_many(
        self,
        topic: str,
        events: Iterable[Event],
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        """Publish several events in order, with one round trip where the broker allows."""
        check_name("topic", topic)
        meta = with_correlation(Metadata.coerce(metadata))
        messages = []
        for index, event in enumerate(events):
            if not isinstance(event, Event):
                raise NotAnEvent(event, index)
            messages.append(
                encode(topic, event, key=key, metadata=meta, source=self.source, codec=self.codec)
            )
        self._check_open()
        if messages:
            with telemetry.publish_span(self, topic) as span:
                telemetry.published(self, topic, messages, span, new=True)
                await self._publish(topic, messages)

    async def publish_message(self, message: Message) -> None:
        """Publish an already encoded message (a relay, or a dead letter being replayed)."""
        self._check_open()
        await self._publish(message.topic, [message])

    # -- consuming -------------------------------------------------------------------------

    async def publish_records(self, topic: str, records: Iterable[RecordedEvent[Any]]) -> None:
        """Publish stored events as they are: each keeps its id (the message id, so a
        re-publish is the same message), stream, version, position, time and metadata, and
        is keyed by its stream id. The outbox relay publishes with it."""
        check_name("topic", topic)
        self._check_open()
        messages = [
            encode(
                topic,
                record.event,
                key=record.stream_id,
                record=record,
                source=self.source,
                codec=self.codec,
            )
            for record in records
        ]
        if messages:
            with telemetry.publish_records_span(self, topic, records) as span:
                telemetry.published(self, topic, messages, span, new=False)
                await self._publish(topic, messages)

    @asynccontextmanager
    async def subscribe(
        self, topic: str, *, group: str, prefetch: int = 16, codec: JSONCodec | None = None
    ) -> AsyncIterator[AsyncIterator[Delivery]]:
        """Join `group` on `topic`: `async with broker.subscribe(t, group=g) as deliveries:`.

        Members of one group compete for messages; each group gets every message published
        after it was first declared (`declare` ahead of publishing to miss nothing).
        Unacked messages of a member that goes away are delivered to another. `codec`
        decodes the deliveries with a consumer's own event classes (default: the broker's).
        """
        check_name("topic", topic)
        check_name("group", group)
        self._check_open()
        member = _Member(self, topic, group, prefetch, codec or self.codec)
        try:
            yield member.deliveries()
        finally:
            await member.close()

    async def declare(self, topic: str, group: str) -> None:
        """Create `group` on `topic` now, so it keeps messages published before it joins."""
        self._check_open()
        await self._declare(check_name("topic", topic), check_name("group", group))

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self, topic: str | None = None) -> list[DeadLetter]:
        """Every dead letter (of one topic), oldest first."""
        self._check_open()
        return [d for d in await self._dead_letters() if topic is None or d.topic == topic]

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; `LookupError` naming it when there is none."""
        for dead in await self.dead_letters():
            if dead.id == dead_letter_id:
                return dead
        raise DeadLetterNotFound(dead_letter_id)

    async def replay(self, dead_letter_id: str) -> DeadLetter:
        """Publish a dead letter's original message again, for its group only to retry, and
        remove it from the dead letters."""
        dead = await self.dead_letter(dead_letter_id)
        await self._redeliver(dead)
        await self._drop_dead_letter(dead.id)
        return dead

    async def _add_dead_letter(self, dead: DeadLetter) -> None:
        await self._store_dead_letter(dead)

    # -- adapter primitives ----------------------------------------------------------------

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _publish(self, topic: str, messages: list[Message]) -> None:
        """Store `messages` durably on `topic`, in order."""

    @abstractmethod
    async def _declare(self, topic: str, group: str) -> None:
        """Make sure `group` exists on `topic` (idempotent)."""

    @abstractmethod
    def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        """Messages for this member: competing with the group's other members, never two of
        one key at once, redelivering what departed members left unacked."""

    @abstractmethod
    async def _leave(self, topic: str, group: str, member: str) -> None:
        """The member leaves: its unacked messages go back to the group."""

    @abstractmethod
    async def _redeliver(self, dead: DeadLetter) -> None:
        """Deliver a dead letter's message again to its group only."""

    @abstractmethod
    async def _store_dead_letter(self, dead: DeadLetter) -> None: ...

    @abstractmethod
    async def _dead_letters(self) -> list[DeadLetter]: ...

    @abstractmethod
    async def _drop_dead_letter(self, dead_letter_id: str) -> None: ...


class DeadLetterNotFound(TidingsError, LookupError):
    """No dead letter has that id."""

    def __init__(self, dead_letter_id: str) -> None:
        self.dead_letter_id = dead_letter_id
        super().__init__(f"no dead letter {dead_letter_id!r}")


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
