"""tidings: events, event sourcing, CQRS and brokers for Python services.

The public API lives here; import from `tidings`, not from its modules.
"""

from tidings.app.aggregate import Aggregate
from tidings.app.commands import Command, CommandBus, CommandContext, handles
from tidings.app.decisions import Decision, DecisionModel, DecisionProjection, DecisionState
from tidings.app.handlers import on
from tidings.app.inbox import Inbox, PostgresInbox, SQLiteInbox, open_inbox
from tidings.app.outbox import OutboxRelay, Route, routes
from tidings.app.process import ProcessDriver, ProcessManager, reacts_to
from tidings.app.projections import Projection, ReadModel, View
from tidings.app.repository import Repository
from tidings.app.runner import ProjectionRunner, ProjectionStatus, projection_status
from tidings.app.service import Context, Retry, Service
from tidings.asyncapi import Contract, ServiceContract
from tidings.brokers import Broker, DeadLetter, Delivery, open_broker
from tidings.core.cloudevents import from_cloudevent, to_cloudevent
from tidings.core.codec import JSONCodec
from tidings.core.context import Correlation, caused_by, correlate, current_correlation
from tidings.core.errors import (
    AggregateNotFound,
    AppendConditionFailed,
    BrokerError,
    ConfigurationError,
    DuplicateEventType,
    EventDecodeError,
    EventDefinitionError,
    EventIdConflict,
    EventTooLarge,
    InvalidAppend,
    InvalidCloudEvent,
    InvalidCommand,
    InvalidEvents,
    InvalidExpectedVersion,
    InvalidMetadata,
    InvalidStreamId,
    NoCommandHandler,
    NotAnEvent,
    ProjectionError,
    StoreClosed,
    StoreError,
    StoreNotFound,
    TidingsError,
    UnhandledEvent,
    UnknownEventType,
    WrongExpectedVersion,
)
from tidings.core.events import Event, TypeRegistry, UnknownEvent, default_registry
from tidings.core.ids import uuid7
from tidings.core.metadata import Metadata
from tidings.core.personal import REDACTED, Personal
from tidings.core.query import AppendCondition, Query, QueryItem
from tidings.core.recorded import RecordedEvent
from tidings.core.upcasting import Upcaster, UpcasterGap, upcaster
from tidings.store import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    ExpectedVersion,
    ProjectionState,
    QueryResult,
    Snapshot,
    StreamInfo,
    StreamState,
    open_store,
)
from tidings.testing import given

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "Aggregate",
    "AggregateNotFound",
    "AppendCondition",
    "AppendConditionFailed",
    "AppendResult",
    "Broker",
    "BrokerError",
    "Command",
    "CommandBus",
    "CommandContext",
    "ConfigurationError",
    "Context",
    "Contract",
    "Correlation",
    "DeadLetter",
    "Decision",
    "DecisionModel",
    "DecisionProjection",
    "DecisionState",
    "Delivery",
    "DuplicateEventType",
    "Event",
    "EventDecodeError",
    "EventDefinitionError",
    "EventIdConflict",
    "EventStore",
    "EventTooLarge",
    "ExpectedVersion",
    "Inbox",
    "InvalidAppend",
    "InvalidCloudEvent",
    "InvalidCommand",
    "InvalidEvents",
    "InvalidExpectedVersion",
    "InvalidMetadata",
    "InvalidStreamId",
    "JSONCodec",
    "Metadata",
    "NO_STREAM",
    "NoCommandHandler",
    "NotAnEvent",
    "OutboxRelay",
    "Personal",
    "PostgresInbox",
    "ProcessDriver",
    "ProcessManager",
    "Projection",
    "ProjectionError",
    "ProjectionRunner",
    "ProjectionState",
    "ProjectionStatus",
    "Query",
    "QueryItem",
    "QueryResult",
    "REDACTED",
    "ReadModel",
    "RecordedEvent",
    "Repository",
    "Retry",
    "Route",
    "SQLiteInbox",
    "STREAM_EXISTS",
    "Service",
    "ServiceContract",
    "Snapshot",
    "StoreClosed",
    "StoreError",
    "StoreNotFound",
    "StreamInfo",
    "StreamState",
    "TidingsError",
    "TypeRegistry",
    "UnhandledEvent",
    "UnknownEvent",
    "UnknownEventType",
    "Upcaster",
    "UpcasterGap",
    "View",
    "WrongExpectedVersion",
    "caused_by",
    "correlate",
    "current_correlation",
    "default_registry",
    "from_cloudevent",
    "given",
    "handles",
    "on",
    "open_broker",
    "open_inbox",
    "open_store",
    "projection_status",
    "reacts_to",
    "routes",
    "to_cloudevent",
    "upcaster",
    "uuid7",
]
