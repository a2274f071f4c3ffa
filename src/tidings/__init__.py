"""tidings: events, event sourcing, CQRS and brokers for Python services.

The public API lives here; import from `tidings`, not from its modules.
"""

from tidings.core.cloudevents import from_cloudevent, to_cloudevent
from tidings.core.codec import JSONCodec
from tidings.core.errors import (
    ConfigurationError,
    DuplicateEventType,
    EventDecodeError,
    EventDefinitionError,
    EventIdConflict,
    EventTooLarge,
    InvalidAppend,
    InvalidCloudEvent,
    InvalidEvents,
    InvalidExpectedVersion,
    InvalidMetadata,
    InvalidStreamId,
    NotAnEvent,
    StoreClosed,
    StoreError,
    StoreNotFound,
    TidingsError,
    UnknownEventType,
    WrongExpectedVersion,
)
from tidings.core.events import Event, TypeRegistry, UnknownEvent, default_registry
from tidings.core.ids import uuid7
from tidings.core.metadata import Metadata
from tidings.core.recorded import RecordedEvent
from tidings.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    ExpectedVersion,
    StreamInfo,
    StreamState,
    open_store,
)

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "AppendResult",
    "ConfigurationError",
    "DuplicateEventType",
    "Event",
    "EventDecodeError",
    "EventDefinitionError",
    "EventIdConflict",
    "EventStore",
    "EventTooLarge",
    "ExpectedVersion",
    "InvalidAppend",
    "InvalidCloudEvent",
    "InvalidEvents",
    "InvalidExpectedVersion",
    "InvalidMetadata",
    "InvalidStreamId",
    "JSONCodec",
    "Metadata",
    "NO_STREAM",
    "NotAnEvent",
    "RecordedEvent",
    "STREAM_EXISTS",
    "StoreClosed",
    "StoreError",
    "StoreNotFound",
    "StreamInfo",
    "StreamState",
    "TidingsError",
    "TypeRegistry",
    "UnknownEvent",
    "UnknownEventType",
    "WrongExpectedVersion",
    "default_registry",
    "from_cloudevent",
    "open_store",
    "to_cloudevent",
    "uuid7",
]
