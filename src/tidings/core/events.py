"""Events: immutable, typed facts, registered by type name and schema version.

```python
class Deposited(Event, type="account.deposited", version=1):
    amount: int
```

Declaring the class registers `("account.deposited", 1)` in a `TypeRegistry` (the default
one unless `registry=` says otherwise), which is how stored and published events find their
class again. A class declared without `type=` is an abstract base: it can be subclassed but not
stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from tidings.core.errors import DuplicateEventType, EventDefinitionError, UnknownEventType
from tidings.core.ids import uuid7

__all__ = ["Event", "TypeRegistry", "UnknownEvent", "default_registry"]

_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")


class TypeRegistry:
    """Maps `(type name, schema version)` to the `Event` class that reads and writes it."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, int], type[Event]] = {}

    def register(self, cls: type[Event]) -> None:
        """Add `cls`; another class already holding its (type, version) is an error.

        Even a class of the same name from a reloaded module is refused: two classes for one
        stored type would make decoding depend on which was declared last.
        """
        if cls.__event_type__ is None:
            raise EventDefinitionError(f"{cls.__qualname__} has no type=; it cannot be registered")
        key = (cls.__event_type__, cls.__event_version__)
        existing = self._classes.get(key)
        if existing is not None and existing is not cls:
            raise DuplicateEventType(key[0], key[1], existing, cls)
        self._classes[key] = cls

    def get(self, type: str, version: int) -> type[Event]:
        """The class for (type, version); `UnknownEventType` when none is registered."""
        try:
            return self._classes[(type, version)]
        except KeyError:
            raise UnknownEventType(type, version) from None

    def find(self, type: str, version: int) -> type[Event] | None:
        """Like `get`, but None when unknown."""
        return self._classes.get((type, version))

    def __contains__(self, key: object) -> bool:
        return key in self._classes

    def __iter__(self) -> Iterator[type[Event]]:
        return iter(
            sorted(self._classes.values(), key=lambda c: (c.__event_type__, c.__event_version__))
        )

    def __len__(self) -> int:
        return len(self._classes)


default_registry = TypeRegistry()


class Event(BaseModel):
    """Base class of every event: a frozen pydantic model naming its type and version.

    Subclass with `type=` (the stable name stored and published, e.g. `"account.deposited"`)
    and optionally `version=` (the schema version, default 1). Each instance has an id
    (`event_id`, a UUIDv7 fixed the first time it is read), so appending the same instance
    twice is an idempotent retry, not a second fact.
    """

    model_config = ConfigDict(frozen=True)

    __event_type__: ClassVar[str | None] = None
    __event_version__: ClassVar[int] = 0
    __event_registry__: ClassVar[TypeRegistry | None] = None

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        version: int = 1,
        registry: TypeRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type is None:
            cls.__event_type__ = None  # an abstract base; never inherit a concrete name
            cls.__event_version__ = 0
            cls.__event_registry__ = None
            return
        if not isinstance(type, str) or not _TYPE_NAME.match(type):
            raise EventDefinitionError(
                f"{cls.__qualname__}: type={type!r} must be 1-255 characters of letters, "
                "digits and . _ : / - starting with a letter or digit"
            )
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise EventDefinitionError(
                f"{cls.__qualname__}: version={version!r} must be an integer >= 1"
            )
        cls.__event_type__ = type
        cls.__event_version__ = version
        cls.__event_registry__ = registry if registry is not None else default_registry

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Runs once pydantic has built the fields, so the registry only ever sees whole classes.
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__event_registry__ is not None:
            cls.__event_registry__.register(cls)

    @property
    def event_id(self) -> UUID:
        """This fact's identity; the store keeps it as `RecordedEvent.id`."""
        # Kept in pydantic's private slot, not a declared PrivateAttr: declaring one makes
        # pydantic run Python code on every validation, which doubles the cost of decoding.
        private = self.__pydantic_private__
        if private is None:
            private = {"_id": uuid7()}
            object.__setattr__(self, "__pydantic_private__", private)
        return private["_id"]  # type: ignore[no-any-return]

    def with_id(self, event_id: UUID) -> Self:
        """A copy of this event carrying `event_id` (for ids decided elsewhere)."""
        clone = self.model_copy()
        object.__setattr__(clone, "__pydantic_private__", {"_id": event_id})
        return clone

    def __eq__(self, other: object) -> bool:
        # Equal data means equal facts' content; the id is identity, not content.
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.__dict__.values())))


class UnknownEvent(Event):
    """A stored or received event whose (type, version) has no registered class.

    Readers that ask for it (the CLI, the console, log tails) get this instead of an error.
    Appending it stores `data` under `type` and `version` unchanged, so raw events can be copied.
    """

    type: str
    version: int
    data: dict[str, Any]
    raw: str | None = Field(default=None, exclude=True, repr=False)
    """The data's JSON text as it was read, passed on unchanged when the event is written
    again (a relay copies events without re-encoding them); None when built by hand."""

    def __eq__(self, other: object) -> bool:  # the same event whether read or built
        if not isinstance(other, UnknownEvent):
            return NotImplemented
        return (self.type, self.version, self.data) == (other.type, other.version, other.data)

    def __hash__(self) -> int:
        return hash((self.type, self.version))
