"""What a store hands back: an event together with where and when it was stored."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, NamedTuple, TypeVar
from uuid import UUID

from tidings.core.events import Event
from tidings.core.metadata import Metadata

__all__ = ["RecordedEvent"]

E = TypeVar("E", bound=Event, covariant=True)


class RecordedEvent(NamedTuple, Generic[E]):
    """A stored event: its typed `event` plus its place in its stream and in the global log.

    `version` counts from 1 within `stream_id`; `position` is the event's place in the store's
    global log, strictly increasing in commit order. `recorded_at` is timezone-aware UTC.
    `id` is the event's id (`event.event_id`); `type` and `schema_version` are as stored,
    or as upcast (the newest class's); `metadata` holds the correlation and causation ids;
    `tags` are the tags it was stored with (see `Event.event_tags`), in declared order.
    Immutable; a named tuple because reading a million events builds a million of these.
    """

    id: UUID
    stream_id: str
    version: int
    position: int
    type: str
    schema_version: int
    recorded_at: datetime
    event: E
    metadata: Metadata
    tags: tuple[str, ...] = ()

    @property
    def correlation_id(self) -> str | None:
        """Shortcut for `metadata.correlation_id`."""
        return self.metadata.correlation_id

    @property
    def causation_id(self) -> str | None:
        """Shortcut for `metadata.causation_id`."""
        return self.metadata.causation_id
