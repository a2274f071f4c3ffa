"""`MemoryEventStore`: the whole store in one process's memory, for tests and demos.

It is a full sibling of the SQLite and PostgreSQL stores, not a mock: rows are encoded and
decoded through the same codec, so size limits, unknown types and decode errors behave the
same. Nothing survives the process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple
from uuid import UUID

from tidings.core.codec import EncodedEvent, JSONCodec
from tidings.core.errors import ConfigurationError, WrongExpectedVersion
from tidings.store.base import (
    DEFAULT_MAX_EVENT_SIZE,
    AppendResult,
    ExpectedVersion,
    Row,
    StoreBase,
    StreamInfo,
    expected_matches,
    resolve_duplicates,
    url_options,
)

__all__ = ["MemoryEventStore"]


class _Row(NamedTuple):
    position: int
    id: UUID
    stream_id: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: str
    metadata: str | None


class MemoryEventStore(StoreBase):
    """An event store held in a list and a few dicts; `memory://`."""

    shared_across_processes = False

    def __init__(
        self,
        url: str = "memory://",
        *,
        codec: JSONCodec | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        batch_size: int = 1000,
        create: bool = True,
    ) -> None:
        """`create` is accepted for symmetry with the other stores; memory is always new."""
        super().__init__(codec=codec, max_event_size=max_event_size, batch_size=batch_size)
        del create
        self.url = url
        self._log: list[_Row] = []  # index i holds position i + 1
        self._streams: dict[str, list[int]] = {}  # stream id -> positions of its events
        self._ids: dict[UUID, int] = {}  # event id -> position

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryEventStore:
        """Build from `memory://` with options as query parameters or keywords."""
        parts = url.split("?", 1)[0]
        if parts not in ("memory://", "memory:", "memory:///"):
            raise ConfigurationError(f"a memory store URL is just 'memory://', got {url!r}")
        merged = (
            url_options(url, {"max_event_size": int, "batch_size": int, "create": bool}) | options
        )
        return cls(url, **merged)

    async def _open(self) -> None:
        pass

    async def _close(self) -> None:
        pass

    async def _append(
        self,
        stream_id: str,
        expected: ExpectedVersion,
        events: list[EncodedEvent],
        metadata: str | None,
    ) -> AppendResult:
        # No await in here: on one event loop the whole append is atomic.
        positions = self._streams.get(stream_id, [])
        actual = len(positions)
        found = {e.id: self._located(e.id) for e in events if e.id in self._ids}
        if found:
            return resolve_duplicates(stream_id, [e.id for e in events], found)
        if not expected_matches(expected, actual):
            raise WrongExpectedVersion(stream_id, expected, actual)
        now = datetime.now(UTC)
        for offset, e in enumerate(events, start=1):
            position = len(self._log) + 1
            self._log.append(
                _Row(
                    position,
                    e.id,
                    stream_id,
                    actual + offset,
                    e.type,
                    e.schema_version,
                    now,
                    e.data,
                    metadata,
                )
            )
            positions.append(position)
            self._ids[e.id] = position
        self._streams[stream_id] = positions
        return AppendResult(version=actual + len(events), position=len(self._log))

    def _located(self, event_id: UUID) -> tuple[str, int, int]:
        row = self._log[self._ids[event_id] - 1]
        return row.stream_id, row.version, row.position

    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        positions = self._streams.get(stream_id, [])
        if backwards:
            start = min(from_version, len(positions))
            chosen = positions[max(start - limit, 0) : start][::-1]
        else:
            chosen = positions[max(from_version - 1, 0) : max(from_version - 1, 0) + limit]
        return [self._log[p - 1] for p in chosen]

    async def _read_all_batch(
        self, after: int, limit: int, types: frozenset[str] | None
    ) -> tuple[list[Row], int]:
        out: list[Row] = []
        index = max(after, 0)
        end = len(self._log)
        scanned = after
        while index < end and len(out) < limit:
            row = self._log[index]
            if types is None or row.type in types:
                out.append(row)
            scanned = row.position
            index += 1
            if types is not None and index - after >= limit * 10:
                break  # keep each batch's work bounded when the filter matches little
        return out, scanned

    async def _stream_version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))

    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        names = sorted(name for name in self._streams if name > after)[:limit]
        return [StreamInfo(name, len(self._streams[name])) for name in names]

    async def _last_position(self) -> int:
        return len(self._log)
