"""`MemoryEventStore`: the whole store in one process's memory, for tests and demos.

It is a full sibling of the SQLite and PostgreSQL stores, not a mock: rows are encoded and
decoded through the same codec, so size limits, unknown types and decode errors behave the
same. Nothing survives the process.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple
from uuid import UUID

from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError, WrongExpectedVersion
from tidings.core.personal import new_key
from tidings.core.query import Selection
from tidings.store.appending import EncodedAppend
from tidings.store.base import (
    DEFAULT_MAX_EVENT_SIZE,
    AppendResult,
    ProjectionState,
    Row,
    Snapshot,
    StoreBase,
    StreamInfo,
    advance_projection,
    begin_rebuild,
    expected_matches,
    resolve_duplicates,
    swap_rebuild,
    url_options,
)
from tidings.store.checkpoints import (
    ProjectionCommit,
    documents_owner,
    segment_prefix,
    segment_rows,
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
    tags: tuple[str, ...]


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
        self._snapshots: dict[str, list[Snapshot]] = {}  # stream id -> snapshots by version
        self._projections: dict[str, ProjectionState] = {}
        self._documents: dict[tuple[str, int], dict[str, str]] = {}  # (name, generation) -> docs
        self._keys: dict[str, bytes] = {}  # data subject -> its key
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (owner, expires, monotonic)

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

    async def _append(self, batch: EncodedAppend) -> AppendResult:
        stream_id, events = batch.stream_id, batch.events
        # No await in here: on one event loop the whole append is atomic.
        positions = self._streams.get(stream_id, [])
        actual = len(positions)
        found = {e.id: self._located(e.id) for e in events if e.id in self._ids}
        if found:
            return resolve_duplicates(stream_id, [e.id for e in events], found)
        if not expected_matches(batch.expected, actual):
            raise WrongExpectedVersion(stream_id, batch.expected, actual)
        condition = batch.condition
        if condition is not None:
            for row in self._log[condition.after :]:
                if condition.selection is None or condition.selection.matches(row.type, row.tags):
                    raise condition.failed(stream_id, row.position, row.type)
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
                    batch.metadata,
                    e.tags,
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
        self, after: int, limit: int, selection: Selection | None
    ) -> tuple[list[Row], int]:
        out: list[Row] = []
        index = max(after, 0)
        end = len(self._log)
        scanned = after
        while index < end and len(out) < limit:
            row = self._log[index]
            if selection is None or selection.matches(row.type, row.tags):
                out.append(row)
            scanned = row.position
            index += 1
        return out, scanned

    async def _stream_version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))

    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        names = sorted(name for name in self._streams if name > after)[:limit]
        return [StreamInfo(name, len(self._streams[name])) for name in names]

    async def _last_position(self) -> int:
        return len(self._log)

    # -- snapshots -------------------------------------------------------------------------

    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        kept = [s for s in self._snapshots.get(stream_id, []) if s.version != version]
        kept.append(Snapshot(stream_id, version, type, schema_version, datetime.now(UTC), data))
        kept.sort(key=lambda s: s.version)
        self._snapshots[stream_id] = kept

    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        for snapshot in reversed(self._snapshots.get(stream_id, [])):
            if max_version is not None and snapshot.version > max_version:
                continue
            if recorded_until is not None and snapshot.recorded_at > recorded_until:
                continue
            return snapshot
        return None

    # -- projections -----------------------------------------------------------------------

    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        if name is not None:
            state = self._projections.get(name)
            return [state] if state else []
        return [self._projections[n] for n in sorted(self._projections)]

    async def _commit_projection(self, commit: ProjectionCommit) -> None:
        name, now = commit.name, datetime.now(UTC)
        state = advance_projection(self._projections.get(name), commit, now)
        owner = commit.documents or name
        if commit.documents is not None:
            main = documents_owner(self._projections.get(owner), commit, now)
            if main is not None:
                self._projections[owner] = main
        docs = self._documents.setdefault((owner, commit.generation), {})
        for key, doc in commit.writes.items():
            if doc is None:
                docs.pop(key, None)
            else:
                docs[key] = doc
        self._projections[name] = state

    async def _start_rebuild(self, name: str) -> ProjectionState:
        state = begin_rebuild(self._projections.get(name), name, datetime.now(UTC))
        assert state.building_generation is not None
        for key in [k for k in self._documents if k[0] == name and k[1] != state.generation]:
            del self._documents[key]  # what an aborted rebuild left behind
        self._documents[(name, state.building_generation)] = {}
        self._projections[name] = state
        return state

    async def _finish_rebuild(self, name: str, generation: int, segments: int) -> None:
        current, now = self._projections.get(name), datetime.now(UTC)
        state = swap_rebuild(current, name, generation, now)
        if current is not None:
            self._documents.pop((name, current.generation), None)
        self._projections[name] = state
        for old in [n for n in self._projections if n.startswith(segment_prefix(name))]:
            del self._projections[old]
        for row in segment_rows(name, segments, generation, state.position, now):
            self._projections[row.name] = row

    def _live(self, name: str, generation: int | None) -> dict[str, str]:
        if generation is None:
            state = self._projections.get(name)
            if state is None:
                return {}
            generation = state.generation
        return self._documents.get((name, generation), {})

    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        docs = self._live(name, generation)
        return {key: docs[key] for key in keys if key in docs}

    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        docs = self._live(name, generation)
        keys = heapq.nsmallest(limit, (key for key in docs if key > after))
        return [(key, docs[key]) for key in keys]

    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        def read(key: str) -> str | None:
            return self._documents.get((name, generation), {}).get(key)

        return read

    # -- leases ----------------------------------------------------------------------------

    # -- personal data ---------------------------------------------------------------------

    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        if create:
            for subject in subjects:
                self._keys.setdefault(subject, new_key())
        return {s: self._keys[s] for s in subjects if s in self._keys}

    async def _forget(self, subject: str) -> None:
        self._keys.pop(subject, None)
        self._snapshots.clear()

    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        holder = self._leases.get(name)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._leases[name] = (owner, now + ttl)
        return True

    async def _release_lease(self, name: str, owner: str) -> None:
        if self._leases.get(name, ("", 0.0))[0] == owner:
            del self._leases[name]

    async def _lease_owners(self, prefix: str) -> dict[str, str]:
        now = time.monotonic()
        return {
            name: owner
            for name, (owner, expires) in self._leases.items()
            if name.startswith(prefix) and expires >= now
        }
