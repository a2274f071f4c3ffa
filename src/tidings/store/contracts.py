"""The `EventStore` protocol and the value types its methods take and return.

What any store must offer, apart from how a backend does it: callers type against
`EventStore`, and backends (through `StoreBase`) implement it. Kept free of behaviour so every
other store module can import it without pulling the rest in.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Self, runtime_checkable

from tidings.core.events import Event
from tidings.core.lifecycle import AsyncContext
from tidings.core.metadata import MetadataLike
from tidings.core.query import AppendCondition, Query
from tidings.core.recorded import RecordedEvent

__all__ = [
    "ANY",
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "NO_STREAM",
    "QueryResult",
    "Row",
    "STREAM_EXISTS",
    "StreamInfo",
    "StreamState",
]


class StreamState(enum.Enum):
    """Expected-version values that are not a number."""

    ANY = "any"
    STREAM_EXISTS = "stream_exists"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


ANY = StreamState.ANY
"""Append whatever the stream's version is."""
STREAM_EXISTS = StreamState.STREAM_EXISTS
"""Append only to a stream that has at least one event."""
NO_STREAM = 0
"""Append only if the stream has no events yet."""

ExpectedVersion = int | StreamState
"""What `append` checks: the version last seen (`NO_STREAM` is 0), `ANY` or `STREAM_EXISTS`."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append left things: the stream's `version` and the last event's `position`."""

    version: int
    position: int


class QueryResult(NamedTuple):
    """What `read_query` returns: the matching `events`, and the `head` the read is complete
    up to (append with `AppendCondition(query, after=head)`)."""

    events: list[RecordedEvent[Any]]
    head: int


class StreamInfo(NamedTuple):
    """A stream id and its current version (its number of events)."""

    stream_id: str
    version: int


Row = Sequence[Any]
"""A stored event as a backend reads it: `(position, id, stream_id, version, type,
schema_version, recorded_at, data, metadata, tags)`; `StoreBase` decodes it."""


@runtime_checkable
class EventStore(AsyncContext, Protocol):
    """An append-only store of event streams with one global, ordered log.

    Streams are numbered from version 1; every event also has a global `position` that grows
    in commit order. Implementations are async context managers holding their connections.
    """

    async def open(self) -> Self:
        """Connect and create or migrate the schema; idempotent."""
        ...

    async def aclose(self) -> None:
        """Close connections; waiting subscribers raise `StoreClosed`."""
        ...

    async def append(
        self,
        stream_id: str,
        events: Iterable[Event],
        expected_version: ExpectedVersion = ANY,
        metadata: MetadataLike | None = None,
        *,
        condition: AppendCondition | None = None,
    ) -> AppendResult:
        """Append `events` to `stream_id` atomically: all are stored or none.

        `expected_version` is the version the writer last saw (`NO_STREAM` is 0), or `ANY`, or
        `STREAM_EXISTS`; a clash raises `WrongExpectedVersion`. `condition` (a dynamic
        consistency boundary) also requires that no event matching its query is stored after
        its position, else `AppendConditionFailed`; checked and written atomically, and both
        must hold. Re-appending events whose ids are already stored, in this stream and in
        this order, stores nothing and returns the original result, whatever
        `expected_version` or `condition` say (a safe retry).
        """
        ...

    def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        """Events of one stream, starting at `from_version` (inclusive).

        Forwards from version 1 by default; with `backwards=True`, from the last version down.
        An unknown stream reads as empty. Streams in batches: memory stays constant. An event
        whose type has no class raises `EventDecodeError`, unless `keep_unknown=True` (or the
        store's codec keeps them): then it arrives as an `UnknownEvent` with its data dict.
        """
        ...

    def read_all(
        self,
        after: int = 0,
        *,
        limit: int | None = None,
        types: Iterable[type[Event] | str] | None = None,
        query: Query | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        """The global log after position `after` (exclusive), in position order.

        `types` keeps only those event types (classes or type names; older names that
        upcasters rename to them too); `query` only the events it matches, by type and tags
        (read through an index; both filters must hold when both are given). Reading again
        from the last position seen never skips an event committed since, nor repeats one.
        `keep_unknown` as for `read_stream`.
        """
        ...

    async def read_query(
        self, query: Query, after: int = 0, *, keep_unknown: bool = False
    ) -> QueryResult:
        """A decision's read (DCB): every event `query` matches after `after`, and the head
        position the read is complete up to, in one go (one round trip on PostgreSQL when
        nothing is in flight). `AppendCondition(query, after=result.head)` then fails if
        anything matching was stored since."""
        ...

    def subscribe(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
        query: Query | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        """Like `read_all`, but once caught up it waits for new events instead of ending.

        Appends through this process wake it at once; appends by other processes are found by
        polling with a short backoff. It never spins the CPU while idle.
        """
        ...

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version: its number of events, 0 when it does not exist."""
        ...

    def streams(self) -> AsyncIterator[StreamInfo]:
        """Every stream with its version, ordered by stream id."""
        ...

    async def last_position(self) -> int:
        """The position of the newest event in the global log, 0 when empty.

        Every event at or below it is readable: an event still being committed below a newer
        one (PostgreSQL draws positions before commit) holds it back, so a decision that reads
        up to it and appends with `AppendCondition(query, after=it)` misses nothing."""
        ...
