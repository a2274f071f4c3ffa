"""`@on(EventType)`: mark a method as the handler of an event type, and find it again.

Aggregates, projections and process managers all declare what they react to the same way;
`HandlerTable` is built once per class and answers "which method handles this event?".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tidings.core.errors import EventDefinitionError, UnknownEventType
from tidings.core.events import Event, UnknownEvent

__all__ = ["Handler", "HandlerTable", "marker", "on"]

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__tidings_on__"


def marker(mark: str, decorator: str) -> Callable[..., Callable[[F], F]]:
    """Build a decorator like `on` that marks handlers under its own attribute name."""

    def decorate(*types: type[Event] | str) -> Callable[[F], F]:
        if not types:
            raise EventDefinitionError(
                f"@{decorator}() needs at least one event class or type name"
            )
        for item in types:
            if isinstance(item, str):
                continue
            if not (isinstance(item, type) and issubclass(item, Event)):
                raise EventDefinitionError(
                    f"@{decorator}() takes Event classes or type names, not {item!r}"
                )

        def mark_it(function: F) -> F:
            setattr(function, mark, (*getattr(function, mark, ()), *types))
            return function

        return mark_it

    return decorate


_on = marker(_MARK, "on")


def on(*types: type[Event] | str) -> Callable[[F], F]:
    """Mark a method as the handler of these event classes (or type names).

    The method takes `(self, event)` or `(self, event, record)`, where `record` is the
    `RecordedEvent` (stream, version, position, metadata) when the event was read from a store.
    A handler for a base class also handles its subclasses.
    """
    return _on(*types)


@dataclass(frozen=True, slots=True)
class Handler:
    """One handler: the function, whether it wants the record, and whether it is async."""

    name: str
    function: Callable[..., Any]
    takes_record: bool
    is_async: bool


class HandlerTable:
    """The `@on` handlers of one class, looked up by event class (walking its bases) or name."""

    def __init__(self, owner: type, mark: str = _MARK) -> None:
        self.owner = owner
        self._by_class: dict[type[Event], Handler] = {}
        self._by_name: dict[str, Handler] = {}
        self._cache: dict[type, Handler | None] = {}
        for name in dir(owner):
            function = inspect.getattr_static(owner, name, None)
            if isinstance(function, (staticmethod, classmethod)):
                continue
            types = getattr(function, mark, None)
            if not types or not callable(function):
                continue
            handler = Handler(name, function, _takes_record(function), _is_async(function))
            for item in types:
                table: dict[Any, Handler] = (
                    self._by_name if isinstance(item, str) else self._by_class
                )
                if item in table and table[item].name != name:
                    raise EventDefinitionError(
                        f"{owner.__qualname__} handles {_label(item)} twice: in "
                        f"{table[item].name}() and {name}()"
                    )
                table[item] = handler
        self._by_type: dict[str, tuple[type[Event], Handler]] = {
            cls.__event_type__: (cls, handler)
            for cls, handler in self._by_class.items()
            if cls.__event_type__ is not None
        }

    def resolve(self, event: Event) -> tuple[Handler, Event] | None:
        """The handler for `event` and the event as that handler expects it; None if none.

        A raw `UnknownEvent` (its type was not in the reading codec's registry) whose type a
        handler names by class is validated into that class here, so the choice of codec can
        never make a handler silently miss its events. A stored version other than the
        class's raises `UnknownEventType`; data that does not fit raises pydantic's
        `ValidationError`.
        """
        if type(event) is UnknownEvent:
            raw: Any = event
            handler = self._by_name.get(raw.type)
            if handler is not None:
                return handler, event
            target = self._by_type.get(raw.type)
            if target is None:
                return None
            cls, handler = target
            if cls.__event_version__ != raw.version:
                raise UnknownEventType(raw.type, raw.version)
            return handler, cls.model_validate(raw.data).with_id(event.event_id)
        found = self.find(event)
        return None if found is None else (found, event)

    def event_classes(self) -> frozenset[type[Event]]:
        """The event classes named by the handlers (type names given as text excluded)."""
        return frozenset(self._by_class)

    def find(self, event: Event) -> Handler | None:
        """The handler for `event`, or None when this class has none."""
        cls = type(event)
        if cls is UnknownEvent:
            return self._by_name.get(event.type)  # type: ignore[attr-defined]
        try:
            return self._cache[cls]
        except KeyError:
            pass
        found = None
        for klass in cls.__mro__:
            if klass in self._by_class:
                found = self._by_class[klass]
                break
        if found is None and cls.__event_type__ is not None:
            found = self._by_name.get(cls.__event_type__)
        self._cache[cls] = found
        return found

    def type_names(self) -> frozenset[str] | None:
        """The stored type names handled, for a store filter; None when a handler is for an
        abstract base class (its subclasses' names are not known here)."""
        names = set(self._by_name)
        for cls in self._by_class:
            if cls.__event_type__ is None:
                return None
            names.add(cls.__event_type__)
        return frozenset(names)

    def __bool__(self) -> bool:
        return bool(self._by_class or self._by_name)


def _takes_record(function: Callable[..., Any]) -> bool:
    params = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params) >= 3  # self, event, record


def _is_async(function: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(function)


def _label(item: type[Event] | str) -> str:
    return item if isinstance(item, str) else item.__qualname__
