"""Process managers (sagas): react to events, keep event-sourced state, send commands.

```python
class OrderFulfilment(ProcessManager):
    correlate_by = "order_id"            # the event field naming the process instance

    @reacts_to(OrderPlaced)              # a reaction: record what it decides, send commands
    def placed(self, event: OrderPlaced) -> None:
        self.send(TakePayment(order_id=event.order_id, amount=event.total))
```

(`@on(EventType)` methods apply its own recorded events to its state, as an aggregate's do;
the demo's `OrderFulfilment` in `tidings/demo/orders.py` is a whole one, with compensation.)

A process manager is an aggregate (stream `"<category>-<process id>"`) whose commands come
from events. `ProcessDriver(OrderFulfilment, bus)` runs it inside a `ProjectionRunner`: for
each event it reacts to, it loads the instance, runs the reaction, dispatches the commands
it sent (caused by that event, in its correlation), then saves the instance's new events,
tagged with the position they answer. A crash before the save repeats the reaction and may
send its commands again (commands must tolerate that); a crash after it is recognised by the
position, so the reaction never runs twice against its own effects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from tidings.app.aggregate import Aggregate
from tidings.app.commands import Command, CommandBus
from tidings.app.handlers import HandlerTable, marker
from tidings.app.projections import Projection, View
from tidings.app.repository import Repository
from tidings.core.context import caused_by
from tidings.core.errors import (
    AggregateNotFound,
    ConfigurationError,
    ProjectionError,
    WrongExpectedVersion,
)
from tidings.core.events import Event
from tidings.core.metadata import Metadata
from tidings.core.recorded import RecordedEvent

__all__ = ["ProcessDriver", "ProcessManager", "reacts_to"]

P = TypeVar("P", bound="ProcessManager")
F = TypeVar("F", bound=Callable[..., Any])
SOURCE_POSITION = "tidings-source-position"
"""Metadata header on a process manager's events: the log position of the event it answered."""
_REACTS = "__tidings_reacts__"
_RETRIES = 5

_reacts_to = marker(_REACTS, "reacts_to")


def reacts_to(*types: type[Event] | str) -> Callable[[F], F]:
    """Mark a process manager method as its reaction to these event types.

    It takes `(self, event)` or `(self, event, record)`, records the manager's own events with
    `self.record(...)` and asks for work with `self.send(command)`.
    """
    return _reacts_to(*types)


class ProcessManager(Aggregate):
    """Base class of process managers: an aggregate whose commands come from events.

    `@reacts_to` methods record the manager's own events and `send` commands; a
    `ProcessDriver` runs them from the log, once per event.

    Set `correlate_by` to the event field that names the instance, or override
    `process_id` for anything else (return None to ignore an event).
    """

    correlate_by: ClassVar[str | None] = None
    __reactions__: ClassVar[HandlerTable]
    processed_position: int = 0
    """The log position of the last event this instance reacted to and saved."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__reactions__ = HandlerTable(cls, _REACTS)

    def __init__(self, id: Any) -> None:
        super().__init__(id)
        self._outbox: list[Command] = []

    def send(self, command: Command) -> None:
        """Dispatch `command` once this reaction is done (caused by the event)."""
        if not isinstance(command, Command):
            raise TypeError(f"send() takes a Command, not {type(command).__qualname__}")
        self._outbox.append(command)

    @property
    def sent(self) -> tuple[Command, ...]:
        """Commands sent by the current reaction, not yet dispatched."""
        return tuple(self._outbox)

    @classmethod
    def process_id(cls, event: Event, record: RecordedEvent[Any] | None) -> str | None:
        """Which instance an event belongs to; None to ignore it."""
        if cls.correlate_by is None:
            raise ConfigurationError(
                f"{cls.__qualname__} sets no correlate_by and does not override process_id()"
            )
        value = getattr(event, cls.correlate_by, None)
        return None if value is None else str(value)

    def command_failed(self, command: Command, error: Exception) -> None:
        """Called when a sent command raises; record a compensation here, or re-raise (the
        default), which stops the process manager on this event."""
        raise error

    def _apply_recorded(self, record: RecordedEvent[Any]) -> None:
        super()._apply_recorded(record)
        source = record.metadata.headers.get(SOURCE_POSITION) if record.metadata else None
        if source is not None:
            self.processed_position = max(self.processed_position, int(source))


class ProcessDriver(Projection):
    """Runs a `ProcessManager` class as a projection of the log (in a `ProjectionRunner`)."""

    def __init__(
        self, manager: type[ProcessManager], bus: CommandBus, *, snapshot_every: int | None = None
    ) -> None:
        if not (isinstance(manager, type) and issubclass(manager, ProcessManager)):
            raise ConfigurationError(f"ProcessDriver needs a ProcessManager class, not {manager!r}")
        if not manager.__reactions__:
            raise ConfigurationError(f"{manager.__qualname__} has no @reacts_to method")
        self.manager = manager
        self.bus = bus
        self.repository: Repository[ProcessManager] = Repository(
            bus.store, manager, snapshot_every=snapshot_every
        )
        self.name = manager.__category__

    def types(self) -> frozenset[str] | None:
        return self.manager.__reactions__.type_names()

    async def apply(self, records: Iterable[RecordedEvent[Any]], view: View) -> None:
        for record in records:
            try:
                await self.react(record)
            except ProjectionError:
                raise
            except Exception as exc:
                raise ProjectionError(
                    self.name, record.position, record.type, f"{type(exc).__name__}: {exc}"
                ) from exc

    async def react(self, record: RecordedEvent[Any]) -> None:
        """Run the reaction to one stored event, exactly once per saved outcome."""
        cls = self.manager
        found = cls.__reactions__.resolve(record.event)
        if found is None:
            return
        handler, event = found
        process_id = cls.process_id(event, record)
        if process_id is None:
            return
        for attempt in range(_RETRIES + 1):
            try:
                manager = await self.repository.get(process_id)
            except AggregateNotFound:
                manager = cls(process_id)
            if record.position <= manager.processed_position:
                return  # reacted and saved before (a crash came before the checkpoint)
            with caused_by(record.id, record.correlation_id, f"process {self.name}"):
                outcome = (
                    handler.function(manager, event, record)
                    if handler.takes_record
                    else handler.function(manager, event)
                )
                if handler.is_async:
                    await outcome
                for command in manager._outbox:
                    try:
                        await self.bus.dispatch(command)
                    except Exception as exc:
                        manager.command_failed(command, exc)
                manager._outbox = []
                try:
                    await self.repository.save(
                        manager, metadata=Metadata(headers={SOURCE_POSITION: str(record.position)})
                    )
                except WrongExpectedVersion:
                    if attempt == _RETRIES:
                        raise
                    continue
            manager.processed_position = record.position
            return
