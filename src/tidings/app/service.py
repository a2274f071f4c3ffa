"""`Service`: typed event handlers on a broker, with retries, dead letters and graceful stop.

```python
service = Service("email", broker=broker)

@service.handler("orders", retry=Retry(attempts=5, backoff=0.2))
async def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
    ...

await service.run()        # or: tidings run myapp.email:service
```

A handler is chosen by the event's class (from its first parameter's annotation). Other
types on the topic go to their own handlers, or are acknowledged and skipped. A handler that
raises is retried in place with exponential backoff and jitter (so a key's order holds),
then the message is dead-lettered with the error and the attempt count. A message that is
not a CloudEvent, does not validate, or has an unknown type is dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tidings import telemetry
from tidings.app.inbox import Inbox, open_inbox
from tidings.brokers.base import BrokerBase, Delivery
from tidings.core.codec import JSONCodec
from tidings.core.context import caused_by
from tidings.core.errors import BrokerError, ConfigurationError, TidingsError
from tidings.core.events import Event, TypeRegistry, UnknownEvent
from tidings.core.metadata import MetadataLike

__all__ = ["Context", "Retry", "Service"]

log = logging.getLogger("tidings.service")
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a failing handler is tried, and how long to wait in between.

    Attempt n waits `backoff * 2**(n-1)` seconds (at most `max_backoff`), times a random
    factor in [1 - jitter, 1 + jitter] so that many consumers do not retry in step.
    """

    attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"invalid retry policy {self!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return float(base * random.uniform(1 - self.jitter, 1 + self.jitter))


@dataclass
class Context:
    """What a handler may need: the delivery, the service, and publishing in its causation."""

    service: Service
    delivery: Delivery
    attempt: int
    db: Any = None
    """With an inbox: its connection, inside the transaction that records this event."""

    @property
    def broker(self) -> BrokerBase:
        """The service's broker."""
        return self.service.broker

    async def publish(
        self,
        topic: str,
        event: Event,
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        """Publish a follow-up event: same correlation, caused by the event being handled."""
        await self.service.broker.publish(topic, event, key=key, metadata=metadata)


@dataclass
class _Handler:
    topic: str
    group: str
    event: type[Event] | None  # None: every event of the topic
    function: Callable[..., Awaitable[Any]]
    retry: Retry
    takes_context: bool
    inbox: Inbox | None = None


@dataclass
class Service:
    """A named set of handlers on one broker; the name is the default consumer group.

    Args:
        name: the service's name: the consumer group of its handlers unless they name one.
        broker: the broker it consumes from (opened by the caller).
        concurrency: members per (topic, group) of its handlers, each handling one message
            at a time.
        shutdown_timeout: seconds in-flight handlers get to finish when `run` is cancelled.
        registry: the service's own event classes, to decode what it receives.
    """

    name: str
    broker: BrokerBase
    concurrency: int = 1
    shutdown_timeout: float = 10.0
    registry: TypeRegistry | None = None
    """The service's own event classes, to decode what it receives (default: the broker's
    codec). Services built apart declare the contract they read, as consumers do."""

    @property
    def _origin(self) -> str:
        return f"service {self.name}"

    _handlers: list[_Handler] = field(default_factory=list, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _waiting: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)  # for a message
    _stopped_waiting: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    def handler(
        self,
        topic: str,
        *,
        group: str | None = None,
        retry: Retry | None = None,
        event: type[Event] | None = None,
        inbox: Inbox | str | None = None,
    ) -> Callable[[H], H]:
        """Register an async handler of `topic` for the event class its first parameter
        names (or `event=`); `group` defaults to the service's name. With an `inbox`, the
        handler runs in a transaction that records the event's id (its writes go through
        `ctx.db`), and an event already processed by the group is acked without running it;
        an inbox URL (`sqlite:///…`, `postgresql://…`) opens one for the service's runs."""
        if isinstance(inbox, str):
            inbox = open_inbox(inbox)

        def register(function: H) -> H:
            if not inspect.iscoroutinefunction(typing.cast(Any, function)):
                raise ConfigurationError(f"{function.__qualname__} must be an async function")
            cls = event or _event_class(function)
            group_name = group or self.name
            for existing in self._handlers:
                if (existing.topic, existing.group, existing.event) == (topic, group_name, cls):
                    raise ConfigurationError(
                        f"{topic}/{group_name} already has a handler for "
                        f"{cls.__qualname__ if cls else 'every event'}"
                    )
            params = list(inspect.signature(function).parameters.values())
            self._handlers.append(
                _Handler(
                    topic, group_name, cls, function, retry or Retry(), len(params) >= 2, inbox
                )
            )
            return function

        return register

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """The (topic, group) pairs this service consumes."""
        return sorted({(h.topic, h.group) for h in self._handlers})

    async def run(self) -> None:
        """Consume until `stop()` or cancellation. Either way no new message is taken and
        in-flight handlers get `shutdown_timeout` seconds to finish and settle; a handler
        still running after that is cancelled and its message stays unacked."""
        if not self._handlers:
            raise ConfigurationError(f"service {self.name!r} has no handlers")
        for topic, group in self.subscriptions:
            await self.broker.declare(topic, group)
        inboxes = {id(h.inbox): h.inbox for h in self._handlers if h.inbox and not h.inbox.opened}
        for inbox in inboxes.values():  # opened here, closed here; the caller's stay open
            await inbox.open()
        members = [
            asyncio.create_task(self._member(topic, group), name=f"{self.name} {topic}/{group}")
            for topic, group in self.subscriptions
            for _ in range(self.concurrency)
        ]
        me = asyncio.current_task()
        try:
            # `wait`, not `gather`: cancelling `run` must not cancel a member mid-handler.
            done, _ = await asyncio.wait(members, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            self.stop()
            if me is not None:
                me.uncancel()  # so the bounded wait below runs; re-raised after it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_timeout):
                    await asyncio.wait(members)
            raise
        finally:
            for task in members:
                task.cancel()
            await asyncio.gather(*members, return_exceptions=True)
            for inbox in inboxes.values():
                await inbox.aclose()
            self._stopping.clear()  # the service can run again
            self._stopped_waiting.clear()

    def stop(self) -> None:
        """Ask `run` to finish (or not to start): no new messages are taken, in-flight ones
        complete and are acknowledged."""
        self._stopping.set()
        for task in self._waiting:  # members waiting for a message stop waiting now
            self._stopped_waiting.add(task)
            task.cancel()
        self._waiting.clear()

    async def _member(self, topic: str, group: str) -> None:
        stopping = self._stopping
        waiting = self._waiting
        me = asyncio.current_task()
        assert me is not None
        codec = None if self.registry is None else JSONCodec(self.registry)
        async with self.broker.subscribe(topic, group=group, codec=codec) as deliveries:
            iterator = aiter(deliveries)
            while not stopping.is_set():
                # Waiting for a message is the one place `stop()` interrupts (by cancelling
                # this task there): a message not yet taken stays with the broker. A handler
                # runs in this task, uninterrupted: `run` only cancels it after the bound.
                waiting.add(me)
                try:
                    delivery = await anext(iterator)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if me not in self._stopped_waiting:
                        raise
                    self._stopped_waiting.discard(me)
                    me.uncancel()
                    break
                finally:
                    waiting.discard(me)
                await self.handle(delivery)

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery: decode, route, retry, dead-letter or skip; then settle it."""
        with telemetry.consume_span(delivery):
            try:
                await self._handle(delivery)
            except BrokerError as exc:  # settling failed (the broker is down): not this
                # member's end; the message is not settled, so the broker delivers it again
                log.warning(
                    "%s: message %s on %s was not settled (%s); it comes again",
                    self.name,
                    delivery.message.id,
                    delivery.topic,
                    exc,
                )

    async def _handle(self, delivery: Delivery) -> None:
        try:
            record = delivery.record
        except TidingsError as exc:
            await delivery.dead_letter(f"{type(exc).__name__}: {exc}")
            return
        handler = self._route(delivery.topic, delivery.group, record.event)
        if handler is None:
            if isinstance(record.event, UnknownEvent):
                await delivery.dead_letter(f"UnknownEventType: no class for {record.type!r}")
            else:
                await delivery.ack()  # another handler's business, or nobody's
            return
        attempt = delivery.attempt
        while True:
            try:
                with caused_by(record.id, record.correlation_id, self._origin):
                    context = Context(self, delivery, attempt)
                    if handler.inbox is None:
                        await self._call(handler, record.event, context)
                    else:
                        async with handler.inbox.transaction(delivery.group, str(record.id)) as db:
                            if db is not None:  # None: processed before, nothing to do
                                context.db = db
                                await self._call(handler, record.event, context)
            except Exception as exc:
                if attempt >= handler.retry.attempts:
                    log.warning(
                        "%s: %s failed %d times; dead-lettered: %s",
                        self.name,
                        record.type,
                        attempt,
                        exc,
                    )
                    await delivery.dead_letter(f"{type(exc).__name__}: {exc}", attempts=attempt)
                    return
                await asyncio.sleep(handler.retry.delay(attempt))
                attempt += 1
                continue
            await delivery.ack()
            return

    @staticmethod
    async def _call(handler: _Handler, event: Event, context: Context) -> None:
        if handler.takes_context:
            await handler.function(event, context)
        else:
            await handler.function(event)

    def _route(self, topic: str, group: str, event: Event) -> _Handler | None:
        catch_all = None
        for handler in self._handlers:
            if handler.topic != topic or handler.group != group:
                continue
            if handler.event is None:
                catch_all = handler
            elif isinstance(event, handler.event):
                return handler
        return catch_all


def _event_class(function: Callable[..., Any]) -> type[Event] | None:
    hints = typing.get_type_hints(function)
    params = list(inspect.signature(function).parameters)
    if not params:
        raise ConfigurationError(f"{function.__qualname__} takes no event parameter")
    cls = hints.get(params[0])
    if cls is None or cls is Event:
        return None
    if not (isinstance(cls, type) and issubclass(cls, Event)):
        raise ConfigurationError(
            f"{function.__qualname__}: annotate its first parameter with an Event class, "
            f"not {cls!r}"
        )
    return cls
