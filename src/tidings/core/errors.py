"""Every error tidings raises, under one root.

```
TidingsError
├── ConfigurationError (ValueError)        a bad URL, option or missing extra
│   └── StoreNotFound (FileNotFoundError)  the store's file does not exist and `create=False`
├── EventDefinitionError (TypeError)       an `Event` class is declared wrongly
│   └── DuplicateEventType                 two classes claim one (type, version)
├── InvalidAppend (ValueError)             input to `append` that is rejected before writing
│   ├── NotAnEvent (TypeError)             something that is not an `Event` instance
│   ├── InvalidEvents (TypeError)          `events` is not a non-empty sequence
│   ├── InvalidExpectedVersion (TypeError) not an int >= 0, NO_STREAM, STREAM_EXISTS or ANY
│   ├── InvalidMetadata (TypeError)        metadata that is not str to str
│   ├── InvalidStreamId (TypeError)        empty, too long, not text
│   ├── EventTooLarge                      encoded size over the store's limit
│   └── EventIdConflict                    an event id already stored elsewhere
├── WrongExpectedVersion                   optimistic concurrency clash
├── AppendConditionFailed                  an event matching a DCB append condition's query
├── UnknownEventType (LookupError)         no class registered for (type, version)
├── EventDecodeError (ValueError)          a stored row that cannot be decoded
├── InvalidCloudEvent (ValueError)         a message that is not a CloudEvent we can read
├── StoreError (RuntimeError)              the database failed (locked, disk full, corrupt)
│   └── BrokerError                        a broker unreachable after bounded retries, or refusing
├── StoreClosed (RuntimeError)             the store is not open
├── AggregateNotFound (LookupError)        `Repository.get` of a stream with no events
├── UnhandledEvent (LookupError)           an aggregate or projection has no `@on` for a type
├── InvalidCommand (pydantic ValidationError) command data failing validation, naming fields
├── NoCommandHandler (LookupError)         a command type nobody handles
└── ProjectionError (RuntimeError)         a projection's handler failed on a stored event
```

Facts are attributes (`stream_id`, `expected`, `actual`, …), so callers branch on data,
never on message text.
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
from dataclasses import InitVar
from typing import Any, ClassVar, TypeVar, dataclass_transform

from pydantic import ValidationError

__all__ = [
    "AggregateNotFound",
    "AppendConditionFailed",
    "BrokerError",
    "ConfigurationError",
    "DuplicateEventType",
    "EventDecodeError",
    "EventDefinitionError",
    "EventIdConflict",
    "EventTooLarge",
    "InvalidAppend",
    "InvalidMetadata",
    "InvalidExpectedVersion",
    "InvalidEvents",
    "InvalidCloudEvent",
    "InvalidCommand",
    "NoCommandHandler",
    "ProjectionError",
    "InvalidStreamId",
    "NotAnEvent",
    "StoreClosed",
    "StoreError",
    "StoreNotFound",
    "TidingsError",
    "UnhandledEvent",
    "UnknownEventType",
    "WrongExpectedVersion",
]

_E = TypeVar("_E", bound="TidingsError")


class TidingsError(Exception):
    """Root of every error raised by tidings."""

    _message: ClassVar[str] = ""
    """The message of an error declared with `@facts`: a `str.format` template over its
    fields and `InitVar`s (`_format` builds it; override that where a template is not enough)."""
    _optional: ClassVar[dict[str, str]] = {}
    """Facts the message shows only when given (not empty), each with how it is shown:
    `{"where": " ({})"}` puts `where` in parentheses, or nothing when `where` is ""."""
    _stored: ClassVar[tuple[str, ...]] = ()  # set by `@facts`: the fields, in order,
    _passed: ClassVar[tuple[str, ...]] = ()  # and the `InitVar`s, in order

    def __post_init__(self, *passed: Any) -> None:
        # Run by the `__init__` that `@facts` writes, once the fields are stored; `passed` are
        # the values of the class's `InitVar`s, which build the message but are not kept.
        values = {name: getattr(self, name) for name in self._stored}
        values.update(zip(self._passed, passed, strict=True))
        super().__init__(self._format(**values))

    def _format(self, **values: Any) -> str:
        """The message (`args[0]`) from the fields and `InitVar`s in `values`."""
        for name, shown in self._optional.items():
            values[name] = shown.format(values[name]) if values[name] else ""
        return self._message.format(**values)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Exceptions pickle as `cls(*args)`, which an `__init__` taking facts, not a message,
        # cannot take: rebuild a `@facts` error from its message and stored fields instead.
        if not dataclasses.is_dataclass(self):
            return super().__reduce__()
        return _restore, (type(self), self.args), self.__dict__


@dataclass_transform(eq_default=False)
def facts(cls: type[_E]) -> type[_E]:
    """Declare a `TidingsError` by its facts: annotated fields (the constructor's parameters,
    in order, kept as attributes; an `InitVar` is a parameter used in the message only) and
    a `_message` template over them. Equality stays identity and `repr` stays the
    exception's, as for every other error."""
    cls = dataclasses.dataclass(eq=False, repr=False)(cls)
    cls._stored = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    parameters = list(inspect.signature(cls.__init__).parameters)[1:]  # after self
    cls._passed = tuple(p for p in parameters if p not in cls._stored)
    return cls


def _restore(cls: type[TidingsError], args: tuple[Any, ...]) -> TidingsError:
    """Unpickle a `@facts` error: its message set as at construction, without `__init__`;
    pickle then sets the fields from the saved `__dict__`."""
    # The `__new__` that `cls(...)` runs is inherited along `__base__`; `cls.__new__` follows
    # the MRO instead, which for `StoreNotFound` finds `ValueError`'s, refusing an `OSError`.
    maker: type = cls
    while "__new__" not in vars(maker):
        maker = maker.__base__ or Exception
    err: TidingsError = maker.__new__(cls, *args)
    super(TidingsError, err).__init__(*args)
    return err


class ConfigurationError(TidingsError, ValueError):
    """A URL, option or installation problem found before any I/O happened."""


@facts
class StoreNotFound(ConfigurationError, FileNotFoundError):
    """The store's database does not exist and the caller asked not to create it."""

    location: str
    _message = "no event store at {location}"


class EventDefinitionError(TidingsError, TypeError):
    """An `Event` subclass is declared wrongly (bad type name or version)."""


@facts
class DuplicateEventType(EventDefinitionError):
    """A second class claims a (type, version) pair that is already registered."""

    type: str
    version: int
    existing: builtins.type
    new: builtins.type
    _message = (
        "event type {type!r} version {version} is already registered by "
        "{existing.__module__}.{existing.__qualname__}; "
        "{new.__module__}.{new.__qualname__} cannot claim it too"
    )


class InvalidAppend(TidingsError, ValueError):
    """Input to `append` rejected before anything was written."""


@facts
class NotAnEvent(InvalidAppend, TypeError):
    """`append` received something that is not an instance of a registered `Event` class."""

    value: Any
    index: int

    def _format(self, **values: Any) -> str:
        kind = type(self.value)
        return (
            f"events[{self.index}] is {kind.__module__}.{kind.__qualname__}, "
            "not an instance of a tidings Event class declared with type=..."
        )


class InvalidEvents(InvalidAppend, TypeError):
    """The `events` argument of `append` is not a non-empty sequence of events."""


@facts
class InvalidExpectedVersion(InvalidAppend, TypeError):
    """An `expected_version` that is not an int >= 0, `NO_STREAM`, `STREAM_EXISTS` or `ANY`."""

    value: Any
    _message = (
        "expected_version must be an int >= 0, NO_STREAM, STREAM_EXISTS or ANY; got {value!r}"
    )


class InvalidMetadata(InvalidAppend, TypeError):
    """Metadata that is not a `Metadata` or a mapping of str to str."""


@facts
class InvalidStreamId(InvalidAppend, TypeError):
    """A stream id that is not a non-empty string of at most 512 characters.

    Both a `ValueError` and a `TypeError`: a wrong value and a value of the wrong type are
    one mistake to the caller, and either `except` clause catches it.
    """

    stream_id: Any
    reason: str

    def _format(self, **values: Any) -> str:
        shown = repr(self.stream_id)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return f"invalid stream id {shown}: {self.reason}"


@facts
class EventTooLarge(InvalidAppend):
    """An event whose encoded data and metadata exceed the store's `max_event_size`."""

    stream_id: str
    index: int
    type: str
    size: int
    limit: int
    _message = (
        "events[{index}] ({type}) for stream {stream_id!r} encodes to {size} bytes, "
        "over the limit of {limit} bytes (max_event_size)"
    )


@facts
class EventIdConflict(InvalidAppend):
    """An event id already stored, but not as the same events of that stream.

    Re-appending exactly the events already stored is an idempotent no-op; anything else
    that reuses their ids (another stream, or only some of them) is this error.
    """

    stream_id: str
    event_id: Any
    detail: InitVar[str]
    _message = "event id {event_id} for stream {stream_id!r}: {detail}"


@facts
class WrongExpectedVersion(TidingsError):
    """The stream is not at the version the writer expected (optimistic concurrency)."""

    stream_id: str
    expected: Any
    actual: int
    _message = "stream {stream_id!r}: expected version {expected}, actual version {actual}"


@facts
class AppendConditionFailed(TidingsError):
    """An event matching the append condition's query is stored after its `after` position
    (a dynamic consistency boundary: the decision was made on stale facts). Nothing was
    stored; read again and decide again."""

    stream_id: str
    after: int | None
    position: int
    type: str
    _message = (
        "append to {stream_id!r} refused: the event at position {position} ({type}) matches "
        "the append condition's query{since}"
    )

    def _format(self, **values: Any) -> str:
        after = values["after"]
        values["since"] = (
            " (after=None: no matching event may exist)"
            if after is None
            else (f" and is after position {after}")
        )
        return super()._format(**values)


@facts
class UnknownEventType(TidingsError, LookupError):
    """No class is registered for this event type and schema version."""

    type: str
    version: int
    _message = (
        "no Event class is registered for type {type!r} version {version} "
        "(import the module that declares it)"
    )


@facts
class EventDecodeError(TidingsError, ValueError):
    """A stored event that cannot be turned back into its typed `Event`."""

    stream_id: str
    version: int
    position: int
    reason: str
    _message = (
        "cannot decode event at position {position} "
        "(stream {stream_id!r}, version {version}): {reason}"
    )


class InvalidCloudEvent(TidingsError, ValueError):
    """A message that is not valid CloudEvents 1.0 structured JSON that tidings can read."""


class StoreError(TidingsError, RuntimeError):
    """The backend failed underneath tidings; the driver's error is the `__cause__`."""


class BrokerError(StoreError):
    """A broker failed underneath tidings: unreachable after the adapter's bounded retries,
    or it refused an operation. A `StoreError` too, so one handler covers any backend."""


class StoreClosed(TidingsError, RuntimeError):
    """The store was used before `open()` / `async with`, or after `aclose()`."""


@facts
class AggregateNotFound(TidingsError, LookupError):
    """`Repository.get` found no events for the aggregate (at that version or moment)."""

    aggregate: str
    aggregate_id: str
    stream_id: str
    detail: InitVar[str] = ""
    _message = "{aggregate} {aggregate_id!r} not found: stream {stream_id!r} is empty{detail}"
    _optional: ClassVar[dict[str, str]] = {"detail": " {}"}


@facts
class UnhandledEvent(TidingsError, LookupError):
    """An aggregate (or projection) met an event type it has no `@on` handler for."""

    owner: str
    type: str
    where: InitVar[str] = ""
    _message = (
        "{owner} has no @on handler for event type {type!r}{where}; add one, or declare "
        "the class with ignore_unknown=True to skip types it does not handle"
    )
    _optional: ClassVar[dict[str, str]] = {"where": " ({})"}


class InvalidCommand(ValidationError, TidingsError):
    """Command data failing validation, before anything runs or is stored.

    It is pydantic's `ValidationError` (so `.errors()` lists each field, its location and
    why) and a `TidingsError`; the message names the command and every bad field.
    """

    @classmethod
    def wrap(cls, exc: ValidationError) -> InvalidCommand:
        """The same errors as `exc`, as an `InvalidCommand`."""
        errors = [
            {k: v for k, v in e.items() if k in ("type", "loc", "input", "ctx")}
            for e in exc.errors(include_url=False)
        ]
        try:
            return cls.from_exception_data(exc.title, errors)  # type: ignore[arg-type]
        except (TypeError, KeyError, ValueError):  # an error type pydantic cannot rebuild
            return cls.from_exception_data(
                exc.title,
                [
                    {
                        "type": "value_error",
                        "loc": e["loc"],
                        "input": e.get("input"),
                        "ctx": {"error": e["msg"]},
                    }
                    for e in exc.errors(include_url=False)
                ],
            )


@facts
class NoCommandHandler(TidingsError, LookupError):
    """A command was dispatched that no registered handler handles."""

    command: str
    _message = "no handler is registered for command {command}"


@facts
class ProjectionError(TidingsError, RuntimeError):
    """A projection handler raised on a stored event; the checkpoint stays before it."""

    projection: str
    position: int
    type: str
    reason: InitVar[str]
    _message = "projection {projection!r} failed on event {type!r} at position {position}: {reason}"
