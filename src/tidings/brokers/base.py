"""`BrokerBase`: what every broker adapter shares.

An adapter subclasses `BrokerBase` and implements a few primitives: publish messages
durably, hand out `Received` messages of a topic to the members of a group (competing, one
key in publish order), take acks and delayed nacks, and keep dead letters. Encoding,
validation and the dead-letter bookkeeping live here, so every broker behaves alike. The
protocol is in `contracts`, deliveries in `delivery`, dead letters in `dead_letters` and
key-order hand-out in `handout`; this module re-exports them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import NoneType
from typing import Any, get_args, get_type_hints
from urllib.parse import urlsplit

from tidings import telemetry
from tidings.brokers.contracts import Broker as Broker
from tidings.brokers.contracts import check_name as check_name
from tidings.brokers.dead_letters import DeadLetter as DeadLetter
from tidings.brokers.dead_letters import DeadLetterNotFound as DeadLetterNotFound
from tidings.brokers.delivery import Delivery as Delivery
from tidings.brokers.delivery import Received as Received
from tidings.brokers.delivery import _Member
from tidings.brokers.envelope import Message, encode
from tidings.core.codec import JSONCodec
from tidings.core.context import with_correlation
from tidings.core.errors import ConfigurationError, NotAnEvent, StoreClosed
from tidings.core.events import Event
from tidings.core.lifecycle import OpenOnce
from tidings.core.metadata import Metadata, MetadataLike
from tidings.core.recorded import RecordedEvent
from tidings.store.options import url_options

__all__ = ["Broker", "BrokerBase", "DeadLetter", "Delivery", "Received"]

log = logging.getLogger("tidings.brokers")


def url_settings(
    cls: type[BrokerBase], url: str, schemes: tuple[str, ...], wrong: str, options: Any
) -> dict[str, Any]:
    """A broker's settings from `url`'s query, under the keyword `options`, once its scheme
    is one of `schemes` (`wrong` begins the error for another)."""
    if urlsplit(url).scheme.lower() not in schemes:
        raise ConfigurationError(f"{wrong}, got {url!r}")
    settings: dict[str, Any] = url_options(url, option_types(cls)) | options
    return settings


_SIMPLE = (str, int, float, bool)


def option_types(cls: type[BrokerBase]) -> dict[str, type]:
    """The options a URL's query may set: the keyword-only parameters of the adapter's
    constructors (its own and its bases' up to `BrokerBase`) of type str, int, float or
    bool (or None). What `BrokerBase` itself takes (`codec`, `source`) is not one."""
    known: dict[str, type] = {}
    for klass in cls.__mro__:
        if klass is BrokerBase or not issubclass(klass, BrokerBase):
            break
        if "__init__" not in vars(klass):
            continue
        hints = get_type_hints(klass.__init__)
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            hint = hints.get(name)
            kinds = [k for k in get_args(hint) or [hint] if k is not NoneType]
            keyword = parameter.kind is parameter.KEYWORD_ONLY and name not in ("codec", "source")
            if keyword and len(kinds) == 1 and kinds[0] in _SIMPLE:
                known.setdefault(name, kinds[0])
    return known


class BrokerBase(OpenOnce, ABC):
    """Shared behaviour of the broker adapters; see `Broker`."""

    #: The CloudEvents header prefix of this broker's binding (binary mode).
    header_prefix = "ce-"

    def __init__(self, *, codec: JSONCodec | None = None, source: str = "tidings") -> None:
        self.codec = codec or JSONCodec()
        self.source = source
        self._departures: dict[str, Callable[[], Awaitable[None]]] = {}  # member -> its leave
        self._leaving: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle (`OpenOnce`) -------------------------------------------------------------

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

    def _join(self, member: str, leave: Callable[[], Awaitable[None]]) -> None:
        """`member` consumes from now on (an adapter's `_receive` says so); `leave` gives
        what it holds back to its group."""
        self._departures[member] = leave

    async def _leave(self, topic: str, group: str, member: str) -> None:
        """The member leaves: its unacked messages go back to the group."""
        await self._depart(member)

    async def _depart(self, member: str) -> None:
        """`member`'s leave, once, and to the end even if the caller is cancelled meanwhile:
        a member left half-way would keep what it holds until its lease, session or
        visibility timeout runs out."""
        leave = self._departures.get(member)
        if leave is None:
            return
        task = self._leaving.get(member)
        if task is None:
            task = self._leaving[member] = asyncio.ensure_future(leave())

            def gone(_: object) -> None:
                self._departures.pop(member, None)
                self._leaving.pop(member, None)

            task.add_done_callback(gone)
        await asyncio.shield(task)

    async def _leave_all(self) -> None:
        """Every member leaves (closing the broker); a failure is logged, not raised, so
        closing goes on."""
        for member in list(self._departures):
            try:
                await self._depart(member)
            except Exception as exc:
                log.warning("%s: member %s did not leave cleanly: %s", self, member, exc)

    @abstractmethod
    async def _redeliver(self, dead: DeadLetter) -> None:
        """Deliver a dead letter's message again to its group only."""

    @abstractmethod
    async def _store_dead_letter(self, dead: DeadLetter) -> None: ...

    @abstractmethod
    async def _dead_letters(self) -> list[DeadLetter]: ...

    @abstractmethod
    async def _drop_dead_letter(self, dead_letter_id: str) -> None: ...
