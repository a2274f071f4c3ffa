"""`Aggregate`: a consistency boundary whose state is the fold of its own events.

```python
class Account(Aggregate):
    balance: int = 0

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount=amount))   # applied at once, queued for `save`

    @on(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount
```

State lives in plain annotated attributes with defaults (a mutable default is copied per
instance; `dataclasses.field(default_factory=list)` and pydantic's `Field` work too), so a
snapshot is just those
attributes, validated by pydantic on the way back in. Behaviour methods decide and `record`;
`@on` handlers only change state, which is what makes replay and time travel exact.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from tidings.app.handlers import HandlerTable
from tidings.core.errors import NotAnEvent, UnhandledEvent
from tidings.core.events import Event
from tidings.core.recorded import RecordedEvent

__all__ = ["Aggregate"]

_RESERVED = frozenset({"id", "version"})
_IMMUTABLE = (int, float, str, bytes, bool, type(None), tuple, frozenset)


class Aggregate:
    """Base class of event-sourced aggregates: state is the fold of the aggregate's events.

    `Account(id)` is a new instance at `version` 0; behaviour methods `record` events and
    `@on` handlers change the annotated state attributes.

    Class keywords: `category=` (stream ids are `"<category>-<id>"`; the default is the class
    name in snake case), `snapshot_version=` (bump it when the state's layout changes, so old
    snapshots are ignored) and `ignore_unknown=True` (skip stored event types with no `@on`).
    """

    __category__: ClassVar[str] = "aggregate"
    __snapshot_version__: ClassVar[int] = 1
    __ignore_unknown__: ClassVar[bool] = False
    __handlers__: ClassVar[HandlerTable]
    __state_fields__: ClassVar[tuple[str, ...]] = ()
    __mutable_defaults__: ClassVar[tuple[tuple[str, Callable[[], Any]], ...]] = ()
    __state_model__: ClassVar[type[BaseModel] | None] = None

    id: Any
    version: int

    def __init_subclass__(
        cls,
        *,
        category: str | None = None,
        snapshot_version: int | None = None,
        ignore_unknown: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.__category__ = category or _snake(cls.__name__)
        if snapshot_version is not None:
            cls.__snapshot_version__ = snapshot_version
        if ignore_unknown is not None:
            cls.__ignore_unknown__ = ignore_unknown
        cls.__handlers__ = HandlerTable(cls)
        cls.__state_fields__ = _state_fields(cls)
        cls.__mutable_defaults__ = tuple(
            (name, _factory(getattr(cls, name)))
            for name in cls.__state_fields__
            if hasattr(cls, name) and not isinstance(getattr(cls, name), _IMMUTABLE)
        )
        cls.__state_model__ = None

    def __init__(self, id: Any) -> None:
        self.id = id
        self.version = 0
        self._pending: list[Event] = []
        for name, make in self.__mutable_defaults__:
            setattr(self, name, make())  # no list shared between instances

    def __repr__(self) -> str:
        state = ", ".join(f"{name}={getattr(self, name, None)!r}" for name in self.__state_fields__)
        return f"{type(self).__name__}(id={self.id!r}, version={self.version}, {state})"

    # -- writing ---------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Apply `event` now and queue it for the repository's next `save`."""
        if not isinstance(event, Event):
            raise NotAnEvent(event, len(self._pending))
        self._apply(event, None)
        self._pending.append(event)

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """Events recorded since the last load or save, in order."""
        return tuple(self._pending)

    # -- applying --------------------------------------------------------------------------

    def _apply(self, event: Event, record: RecordedEvent[Any] | None) -> None:
        found = self.__handlers__.resolve(event)
        if found is None:
            if not self.__ignore_unknown__:
                where = f"stream {record.stream_id!r} version {record.version}" if record else ""
                raise UnhandledEvent(type(self).__qualname__, _type_of(event), where)
            self.version += 1
            return
        handler, event = found
        if handler.takes_record:
            handler.function(self, event, record)
        else:
            handler.function(self, event)
        self.version += 1

    def _apply_recorded(self, record: RecordedEvent[Any]) -> None:
        """Apply one stored event while loading (hook for subclasses that read metadata)."""
        self._apply(record.event, record)

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        """The state to keep in a snapshot: every annotated attribute. Override for more."""
        return {name: getattr(self, name) for name in self.__state_fields__ if hasattr(self, name)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Put a snapshot's state back (the inverse of `snapshot_state`)."""
        self.__dict__.update(state)

    @classmethod
    def _state_model(cls) -> type[BaseModel]:
        """A pydantic model of the state fields, built on first use (for snapshots)."""
        if cls.__state_model__ is None:
            hints = typing.get_type_hints(cls)
            factories = dict(cls.__mutable_defaults__)
            fields: dict[str, Any] = {
                name: (
                    hints.get(name, Any),
                    Field(default_factory=factories[name])
                    if name in factories
                    else getattr(cls, name, ...),
                )
                for name in cls.__state_fields__
            }
            cls.__state_model__ = create_model(
                f"{cls.__name__}Snapshot",
                __config__=ConfigDict(arbitrary_types_allowed=True),
                **fields,
            )
        assert cls.__state_model__ is not None
        return cls.__state_model__

    def _dump_snapshot(self) -> str:
        model = self._state_model()
        return model.model_construct(**self.snapshot_state()).model_dump_json(warnings=False)

    def _load_snapshot(self, data: str) -> None:
        model = self._state_model().model_validate_json(data)
        self.restore_state(dict(model))


def _factory(default: Any) -> Callable[[], Any]:
    """How each instance gets its own copy of a mutable default: a `field(default_factory=)`
    (dataclasses or pydantic) is called, anything else is deep-copied."""
    if (
        isinstance(default, dataclasses.Field)
        and default.default_factory is not dataclasses.MISSING
    ):
        return default.default_factory
    if isinstance(default, FieldInfo) and default.default_factory is not None:
        return default.default_factory  # type: ignore[return-value]
    if isinstance(default, (dataclasses.Field, FieldInfo)):
        value = default.default
        return lambda: copy.deepcopy(value)
    return lambda: copy.deepcopy(default)


def _state_fields(cls: type) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is Aggregate or not issubclass(klass, Aggregate):
            continue
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            text = annotation if isinstance(annotation, str) else repr(annotation)
            if name.startswith("_") or name in _RESERVED or "ClassVar" in text:
                continue
            names[name] = None
    return tuple(names)


def _type_of(event: Event) -> str:
    name = getattr(event, "type", None) if not type(event).__event_type__ else None
    return str(name or type(event).__event_type__ or type(event).__qualname__)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
