"""Events: immutable, typed facts, registered by type name and schema version.

```python
class Deposited(Event, type="account.deposited", version=1):
    amount: int
```

`tags=("account:{account}",)` adds templates rendered from the event's fields with
`str.format`: the tags a dynamic consistency boundary selects events by (`tidings.Query`),
stored with the event and read back as `RecordedEvent.tags`.

Declaring the class registers `("account.deposited", 1)` in a `TypeRegistry` (the default
one unless `registry=` says otherwise), which is how stored and published events find their
class again. A class declared without `type=` is an abstract base: it can be subclassed but not
stored.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Optional, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from tidings.core.errors import DuplicateEventType, EventDefinitionError, UnknownEventType
from tidings.core.ids import own_id
from tidings.core.personal import Personal
from tidings.core.upcast_step import Upcaster, UpcasterGap

__all__ = ["Event", "TypeRegistry", "UnknownEvent", "default_registry"]

_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")


class TypeRegistry:
    """Maps `(type name, schema version)` to the `Event` class that reads and writes it."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, int], type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self.personal = False  # whether any class has Personal fields (reads look for keys)
        self._chains: dict[tuple[str, int], tuple[list[Upcaster], type[Event]] | None] = {}

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
        self.personal = self.personal or bool(cls.__personal__)
        self._chains.clear()

    @classmethod
    def merged(cls, *registries: TypeRegistry) -> TypeRegistry:
        """One registry reading what all of `registries` read: the only one when there is
        one, else a new registry with every class and upcaster (a type claimed twice raises
        `DuplicateEventType`)."""
        unique = list({id(r): r for r in registries}.values())
        if len(unique) == 1:
            return unique[0]
        merged = cls()
        for registry in unique:
            for event_class in registry:
                merged.register(event_class)
            for step in registry.upcasters():
                merged.add_upcaster(step)
        return merged

    @classmethod
    def of(cls, classes: Iterable[type[Event]]) -> TypeRegistry:
        """The registry the event `classes` were declared in (merged when several; the
        default registry when there are none)."""
        found = [c.__event_registry__ or default_registry for c in classes]
        return cls.merged(*found) if found else default_registry

    # -- upcasters ---------------------------------------------------------------------------

    def add_upcaster(self, step: Upcaster) -> None:
        """Add one upcasting step (see `tidings.upcaster`); one per (type, version)."""
        key = (step.type, step.from_version)
        existing = self._upcasters.get(key)
        if existing is not None and existing.function is not step.function:
            raise EventDefinitionError(
                f"{step.type} v{step.from_version} already has the upcaster "
                f"{existing.function.__qualname__}; {step.function.__qualname__} is a second one"
            )
        self._upcasters[key] = step
        self._chains.clear()

    def upcaster(self, type: str, from_version: int) -> Upcaster | None:
        """The step from (type, from_version), if one is registered."""
        return self._upcasters.get((type, from_version))

    def upcasters(self) -> list[Upcaster]:
        """Every registered step, by type and version."""
        return [self._upcasters[key] for key in sorted(self._upcasters)]

    def chain(self, name: str, version: int) -> tuple[list[Upcaster], type[Event]] | None:
        """The steps from stored (name, version) to a registered class, and that class; None
        when there is no class at the end (an unknown type). A class registered for the
        stored version is used as it is (no steps) unless an upcaster starts there."""
        key = (name, version)
        if key in self._chains:
            return self._chains[key]
        steps: list[Upcaster] = []
        seen = {key}
        found: tuple[list[Upcaster], type[Event]] | None = None
        while True:
            cls = self._classes.get(key)
            if cls is not None and not (key == (name, version) and key in self._upcasters):
                found = (steps, cls)
                break
            step = self._upcasters.get(key)
            if step is None:
                break
            steps.append(step)
            key = (step.to_type, step.to_version)
            if key in seen:
                raise EventDefinitionError(f"upcasters of {name} v{version} go round in a loop")
            seen.add(key)
        self._chains[(name, version)] = found
        return found

    def with_sources(self, names: frozenset[str] | None) -> frozenset[str] | None:
        """`names` plus the older type names whose upcasters lead to one of them, so a
        filter by type also finds events stored under a name since renamed."""
        if not names or not self._upcasters:
            return names
        more = set(names)
        for type_, version in self._upcasters:
            chain = self.chain(type_, version)
            if chain is not None and chain[1].__event_type__ in names:
                more.add(type_)
        return frozenset(more)

    def check(self) -> None:
        """Refuse a gap: an upcaster whose chain reaches no registered class, or a type with
        upcasters missing the step from one of its versions below its newest class.
        `UpcasterGap` names the first missing step. Stores and brokers run it on opening."""
        for (type_, version), step in sorted(self._upcasters.items()):
            if self.chain(type_, version) is None:
                end = step
                while (nxt := self._upcasters.get((end.to_type, end.to_version))) is not None:
                    end = nxt
                raise UpcasterGap(
                    f"{type_} v{version} cannot be read: its upcasters lead to "
                    f"{end.to_type} v{end.to_version}, which has no class and no upcaster"
                )
        for type_ in sorted({t for t, _ in self._upcasters}):
            newest = max((v for t, v in self._classes if t == type_), default=None)
            if newest is None:
                continue  # an old name, renamed: its chains were checked above
            known = [v for t, v in self._upcasters if t == type_]
            known += [s.to_version for s in self._upcasters.values() if s.to_type == type_]
            known += [v for t, v in self._classes if t == type_]
            for version in range(min(known), newest):
                if (type_, version) not in self._upcasters:
                    raise UpcasterGap(
                        f"{type_}: no upcaster from v{version} to v{version + 1} "
                        f"(versions {sorted(set(known))} are known, v{newest} is the newest)"
                    )

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
"""The registry every `Event` class joins unless it is declared with `registry=`."""


def _tag_templates(cls: type[Event], templates: tuple[str, ...]) -> None:
    """Refuse a tag template that names no field of the class, a positional `{}`, or a
    personal field (a tag is stored in the clear, for the index)."""
    for template in templates:
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise EventDefinitionError(
                f"{cls.__qualname__}: tag template {template!r} is not a format string ({exc})"
            ) from None
        for _, field, _, _ in parts:
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if not name or name.isdigit():
                raise EventDefinitionError(
                    f"{cls.__qualname__}: tag template {template!r} must name fields, "
                    "as in 'course:{course}'"
                )
            if name not in cls.model_fields:
                raise EventDefinitionError(
                    f"{cls.__qualname__}: tag template {template!r} names {name!r}, which is "
                    f"not a field (fields: {', '.join(cls.model_fields) or 'none'})"
                )
            if name in cls.__personal__:
                raise EventDefinitionError(
                    f"{cls.__qualname__}: tag template {template!r} names the personal field "
                    f"{name!r}; tags are stored in the clear, so they cannot hold one"
                )


def _personal_fields(cls: type[Event]) -> dict[str, str]:
    """The class's `Personal` fields, checked: each a `str` (or `str | None`) whose subject
    is another, non-personal field of the class."""
    found: dict[str, str] = {}
    for name, info in cls.model_fields.items():
        marks = [m for m in info.metadata if isinstance(m, Personal)]
        if not marks:
            continue
        if info.annotation not in (str, str | None, Optional[str]):  # noqa: UP045
            raise EventDefinitionError(
                f"{cls.__qualname__}.{name}: a Personal field must be a str, "
                f"not {info.annotation!r}"
            )
        found[name] = marks[0].subject
    for name, subject in found.items():
        if subject not in cls.model_fields or subject in found:
            raise EventDefinitionError(
                f"{cls.__qualname__}.{name}: Personal(subject={subject!r}) must name another, "
                "non-personal field of the event"
            )
    return found


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
    __personal__: ClassVar[dict[str, str]] = {}
    """Personal fields and the field naming each one's data subject (see `Personal`)."""
    __event_tags__: ClassVar[tuple[str, ...]] = ()
    """The class's tag templates (`tags=`), inherited unless a subclass declares its own."""
    __tagged__: ClassVar[bool] = False
    """Whether instances may have tags (templates, or an overridden `event_tags`)."""

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        version: int = 1,
        registry: TypeRegistry | None = None,
        tags: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if tags is not None:
            if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
                raise EventDefinitionError(
                    f"{cls.__qualname__}: tags= takes a tuple of templates such as "
                    f"('course:{{course}}',), not {tags!r}"
                )
            cls.__event_tags__ = tuple(tags)
        cls.__tagged__ = bool(cls.__event_tags__) or cls.event_tags is not Event.event_tags
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
        cls.__personal__ = _personal_fields(cls)
        _tag_templates(cls, cls.__event_tags__)
        if cls.__event_registry__ is not None:
            cls.__event_registry__.register(cls)

    @property
    def event_id(self) -> UUID:
        """This fact's identity; the store keeps it as `RecordedEvent.id`."""
        return own_id(self)

    def event_tags(self) -> tuple[str, ...]:
        """The tags stored with this event: the class's `tags=` templates rendered with
        `str.format` from its fields, in declared order. Override to compute them otherwise
        (return strings; the store refuses empty, over-long or control-character tags)."""
        templates = self.__event_tags__
        if not templates:
            return ()
        values = self.__dict__
        return tuple(template.format_map(values) for template in templates)

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
    tags: tuple[str, ...] = ()
    """The tags it was stored with, kept when it is written again."""

    def event_tags(self) -> tuple[str, ...]:
        return self.tags

    def __eq__(self, other: object) -> bool:  # the same event whether read or built
        if not isinstance(other, UnknownEvent):
            return NotImplemented
        return (self.type, self.version, self.data) == (other.type, other.version, other.data)

    def __hash__(self) -> int:
        return hash((self.type, self.version))
