"""Commands, the requests of the write side, and the `CommandBus` that routes them.

A command asks for something to happen and may be refused; an event records that it did. A
command entering the bus starts a correlation (or continues the caller's), and every event
appended while its handler runs carries that correlation id with the command's id as its
causation id, so `tidings trace` can follow a request from the command to its last effect.

```python
class OpenAccount(Command):
    account_id: str
    owner: str

@handles(OpenAccount)
async def open_account(command: OpenAccount, ctx: CommandContext) -> None:
    await ctx.repository(Account).save(Account.open(command.account_id, command.owner))

bus = CommandBus(store, open_account)
await bus.dispatch(OpenAccount(account_id="acc-1", owner="ann"))
```
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from tidings import telemetry
from tidings.app.aggregate import Aggregate
from tidings.app.repository import Repository
from tidings.core.context import correlate, current_correlation
from tidings.core.errors import ConfigurationError, InvalidCommand, NoCommandHandler
from tidings.core.ids import own_id
from tidings.store.base import EventStore

__all__ = ["Command", "CommandBus", "CommandContext", "declared_handler", "handles"]

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Aggregate)
_MARK = "__tidings_handles__"


class Command(BaseModel):
    """Base class of commands: a frozen pydantic model; unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except InvalidCommand:
            raise
        except ValidationError as exc:
            raise InvalidCommand.wrap(exc) from None

    @property
    def command_id(self) -> UUID:
        """This request's identity (a UUIDv7): the causation id of the events it causes."""
        return own_id(self)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Build from untrusted data (a dict, or JSON text); `InvalidCommand` names each bad
        field."""
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidCommand.wrap(exc) from None


def handles(*commands: type[Command]) -> Callable[[F], F]:
    """Mark a function (or method) as the handler of these command classes.

    It takes `(command)` or `(command, ctx)`, sync or async; what it returns is what
    `CommandBus.dispatch` returns, and what it raises reaches the caller unchanged.
    """
    for item in commands:
        if not (isinstance(item, type) and issubclass(item, Command)):
            raise ConfigurationError(f"@handles() takes Command classes, not {item!r}")
    if not commands:
        raise ConfigurationError("@handles() needs at least one Command class")

    def mark(function: F) -> F:
        setattr(function, _MARK, (*getattr(function, _MARK, ()), *commands))
        if _is_free_function(function):
            for command in commands:
                _LATEST[command] = function
        return function

    return mark


_LATEST: dict[type[Command], Callable[..., Any]] = {}
"""The most recently declared `@handles` function per command class (for `tidings.testing`)."""


def declared_handler(command: type[Command]) -> Callable[..., Any] | None:
    """The `@handles` function most recently declared for `command` (not methods), if any."""
    return _LATEST.get(command)


def _is_free_function(function: Callable[..., Any]) -> bool:
    parts = getattr(function, "__qualname__", "").split(".")
    return len(parts) == 1 or parts[-2] == "<locals>"


@dataclass
class CommandContext:
    """What a handler may need: the store, repositories, and the command's ids."""

    bus: CommandBus
    command: Command
    correlation_id: str

    @property
    def store(self) -> EventStore:
        """The bus's event store."""
        return self.bus.store

    def repository(self, aggregate: type[A], **options: Any) -> Repository[A]:
        """A repository of `aggregate` on the bus's store (options as for `Repository`)."""
        return self.bus.repository(aggregate, **options)

    async def dispatch(self, command: Command) -> Any:
        """Send a follow-up command, caused by this one and in the same correlation."""
        return await self.bus.dispatch(command)


@dataclass(frozen=True, slots=True)
class _Route:
    function: Callable[..., Any]
    takes_context: bool


class CommandBus:
    """Routes each command to its one handler, inside the command's correlation.

    `CommandBus(store, *handlers)`: handlers are `@handles` functions, or objects (and
    modules) whose `@handles` methods are registered. The store is optional for handlers
    that bring their own; `ctx.store` and `ctx.repository` need it.
    """

    def __init__(self, store: EventStore | None = None, *handlers: object) -> None:
        if store is not None and not isinstance(store, EventStore):
            handlers, store = (store, *handlers), None  # CommandBus(handler, ...) without a store
        self._store = store
        self._routes: dict[type[Command], _Route] = {}
        self._repositories: dict[tuple[Any, ...], Repository[Any]] = {}
        self.register(*handlers)

    def register(self, *handlers: object) -> None:
        """Add `@handles` functions, or every `@handles` method of objects and modules."""
        for target in handlers:
            if getattr(target, _MARK, None) and callable(target):
                self._add(target)
                continue
            found = False
            for name in dir(target):
                attr = getattr(target, name, None)
                if callable(attr) and getattr(attr, _MARK, None):
                    self._add(attr)
                    found = True
            if not found:
                raise ConfigurationError(f"{target!r} has no @handles function or method")

    def handles(self, *commands: type[Command]) -> Callable[[F], F]:
        """Decorator: mark and register a handler on this bus in one step."""
        marker = handles(*commands)

        def register(function: F) -> F:
            self._add(marker(function))
            return function

        return register

    def _add(self, function: Callable[..., Any]) -> None:
        route = _Route(function, _takes_context(function))
        for command in getattr(function, _MARK):
            existing = self._routes.get(command)
            if existing is not None and existing.function != function:
                raise ConfigurationError(
                    f"{command.__qualname__} already has a handler: {_name(existing.function)}"
                )
            self._routes[command] = route

    @property
    def store(self) -> EventStore:
        """The event store handlers reach through `ctx`; an error when the bus has none."""
        if self._store is None:
            raise ConfigurationError("this CommandBus has no store: CommandBus(store, ...)")
        return self._store

    def repository(self, aggregate: type[A], **options: Any) -> Repository[A]:
        """A repository of `aggregate` on this bus's store, shared by its handlers."""
        key = (aggregate, *sorted(options.items()))
        repository = self._repositories.get(key)
        if repository is None:
            repository = self._repositories[key] = Repository(self.store, aggregate, **options)
        return repository

    async def dispatch(self, command: Command, *, correlation_id: str | None = None) -> Any:
        """Run the command's handler and return what it returns.

        The correlation id is `correlation_id`, else the one in effect, else a new one.
        """
        if not isinstance(command, Command):
            raise TypeError(f"dispatch takes a Command instance, not {type(command).__qualname__}")
        route = self._route(type(command))
        origin = f"command {type(command).__name__}"
        outer = current_correlation()  # sent while handling an event: that event sent it
        with (
            correlate(
                correlation_id,
                causation_id=str(command.command_id),
                origin=origin,
                sent_by=outer.causation_id if outer is not None else None,
            ) as context,
            telemetry.command_span(command, context.correlation_id),
        ):
            if route.takes_context:
                outcome = route.function(
                    command, CommandContext(self, command, context.correlation_id)
                )
            else:
                outcome = route.function(command)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        return outcome

    def _route(self, cls: type[Command]) -> _Route:
        for klass in cls.__mro__:
            route = self._routes.get(klass)
            if route is not None:
                return route
            if klass is Command:
                break
        raise NoCommandHandler(cls.__qualname__)


def _takes_context(function: Callable[..., Any]) -> bool:
    params = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 2


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))
