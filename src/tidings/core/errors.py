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

from typing import Any

from pydantic import ValidationError

__all__ = [
    "AggregateNotFound",
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


class TidingsError(Exception):
    """Root of every error raised by tidings."""


class ConfigurationError(TidingsError, ValueError):
    """A URL, option or installation problem found before any I/O happened."""


class StoreNotFound(ConfigurationError, FileNotFoundError):
    """The store's database does not exist and the caller asked not to create it."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__(f"no event store at {location}")


class EventDefinitionError(TidingsError, TypeError):
    """An `Event` subclass is declared wrongly (bad type name or version)."""


class DuplicateEventType(EventDefinitionError):
    """A second class claims a (type, version) pair that is already registered."""

    def __init__(self, type: str, version: int, existing: type, new: type) -> None:
        self.type = type
        self.version = version
        self.existing = existing
        self.new = new
        super().__init__(
            f"event type {type!r} version {version} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}; "
            f"{new.__module__}.{new.__qualname__} cannot claim it too"
        )


class InvalidAppend(TidingsError, ValueError):
    """Input to `append` rejected before anything was written."""


class NotAnEvent(InvalidAppend, TypeError):
    """`append` received something that is not an instance of a registered `Event` class."""

    def __init__(self, value: Any, index: int) -> None:
        self.value = value
        self.index = index
        super().__init__(
            f"events[{index}] is {type(value).__module__}.{type(value).__qualname__}, "
            "not an instance of a tidings Event class declared with type=..."
        )


class InvalidEvents(InvalidAppend, TypeError):
    """The `events` argument of `append` is not a non-empty sequence of events."""


class InvalidExpectedVersion(InvalidAppend, TypeError):
    """An `expected_version` that is not an int >= 0, `NO_STREAM`, `STREAM_EXISTS` or `ANY`."""

    def __init__(self, value: Any) -> None:
        self.value = value
        super().__init__(
            f"expected_version must be an int >= 0, NO_STREAM, STREAM_EXISTS or ANY; got {value!r}"
        )


class InvalidMetadata(InvalidAppend, TypeError):
    """Metadata that is not a `Metadata` or a mapping of str to str."""


class InvalidStreamId(InvalidAppend, TypeError):
    """A stream id that is not a non-empty string of at most 512 characters.

    Both a `ValueError` and a `TypeError`: a wrong value and a value of the wrong type are
    one mistake to the caller, and either `except` clause catches it.
    """

    def __init__(self, stream_id: Any, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason
        shown = repr(stream_id) if len(repr(stream_id)) <= 80 else repr(stream_id)[:77] + "..."
        super().__init__(f"invalid stream id {shown}: {reason}")


class EventTooLarge(InvalidAppend):
    """An event whose encoded data and metadata exceed the store's `max_event_size`."""

    def __init__(self, stream_id: str, index: int, type: str, size: int, limit: int) -> None:
        self.stream_id = stream_id
        self.index = index
        self.type = type
        self.size = size
        self.limit = limit
        super().__init__(
            f"events[{index}] ({type}) for stream {stream_id!r} encodes to {size} bytes, "
            f"over the limit of {limit} bytes (max_event_size)"
        )


class EventIdConflict(InvalidAppend):
    """An event id already stored, but not as the same events of that stream.

    Re-appending exactly the events already stored is an idempotent no-op; anything else
    that reuses their ids (another stream, or only some of them) is this error.
    """

    def __init__(self, stream_id: str, event_id: Any, detail: str) -> None:
        self.stream_id = stream_id
        self.event_id = event_id
        super().__init__(f"event id {event_id} for stream {stream_id!r}: {detail}")


class WrongExpectedVersion(TidingsError):
    """The stream is not at the version the writer expected (optimistic concurrency)."""

    def __init__(self, stream_id: str, expected: Any, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, actual version {actual}"
        )


class UnknownEventType(TidingsError, LookupError):
    """No class is registered for this event type and schema version."""

    def __init__(self, type: str, version: int) -> None:
        self.type = type
        self.version = version
        super().__init__(
            f"no Event class is registered for type {type!r} version {version} "
            "(import the module that declares it)"
        )


class EventDecodeError(TidingsError, ValueError):
    """A stored event that cannot be turned back into its typed `Event`."""

    def __init__(self, stream_id: str, version: int, position: int, reason: str) -> None:
        self.stream_id = stream_id
        self.version = version
        self.position = position
        self.reason = reason
        super().__init__(
            f"cannot decode event at position {position} "
            f"(stream {stream_id!r}, version {version}): {reason}"
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


class AggregateNotFound(TidingsError, LookupError):
    """`Repository.get` found no events for the aggregate (at that version or moment)."""

    def __init__(self, aggregate: str, aggregate_id: str, stream_id: str, detail: str = "") -> None:
        self.aggregate = aggregate
        self.aggregate_id = aggregate_id
        self.stream_id = stream_id
        where = f" {detail}" if detail else ""
        super().__init__(
            f"{aggregate} {aggregate_id!r} not found: stream {stream_id!r} is empty{where}"
        )


class UnhandledEvent(TidingsError, LookupError):
    """An aggregate (or projection) met an event type it has no `@on` handler for."""

    def __init__(self, owner: str, type: str, where: str = "") -> None:
        self.owner = owner
        self.type = type
        at = f" ({where})" if where else ""
        super().__init__(
            f"{owner} has no @on handler for event type {type!r}{at}; add one, or declare "
            f"the class with ignore_unknown=True to skip types it does not handle"
        )


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


class NoCommandHandler(TidingsError, LookupError):
    """A command was dispatched that no registered handler handles."""

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__(f"no handler is registered for command {command}")


class ProjectionError(TidingsError, RuntimeError):
    """A projection handler raised on a stored event; the checkpoint stays before it."""

    def __init__(self, projection: str, position: int, type: str, reason: str) -> None:
        self.projection = projection
        self.position = position
        self.type = type
        super().__init__(
            f"projection {projection!r} failed on event {type!r} at position {position}: {reason}"
        )
