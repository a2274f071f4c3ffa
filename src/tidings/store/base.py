"""The `EventStore` protocol, its value types, and the behaviour every backend shares.

A backend subclasses `StoreBase` and implements the `_`-prefixed primitives (open, close,
append encoded rows, read one batch). Validation, encoding, paging, and the catch-up-then-wait
loop of `subscribe` live here once, so every backend behaves the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self, runtime_checkable
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

from tidings import telemetry
from tidings.core.codec import EncodedEvent, JSONCodec
from tidings.core.context import with_correlation
from tidings.core.errors import (
    ConfigurationError,
    EventIdConflict,
    EventTooLarge,
    InvalidEvents,
    InvalidExpectedVersion,
    InvalidMetadata,
    InvalidStreamId,
    StoreClosed,
    TidingsError,
)
from tidings.core.events import Event
from tidings.core.lifecycle import AsyncResource
from tidings.core.metadata import Metadata, MetadataLike
from tidings.core.personal import PREFIX, subjects_in
from tidings.core.recorded import RecordedEvent

__all__ = [
    "ANY",
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "NO_STREAM",
    "DocumentNotLoaded",
    "ProjectionConflict",
    "ProjectionState",
    "STREAM_EXISTS",
    "Snapshot",
    "StoreBase",
    "StreamInfo",
    "StreamState",
]

MAX_STREAM_ID_LENGTH = 512
_END_OF_STREAM = 2**62  # a version above any real one: "from the last event", backwards
DEFAULT_MAX_EVENT_SIZE = 1024 * 1024
FIRST_BATCH = 128  # rows in the first batch of a stream read


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


class Snapshot(NamedTuple):
    """An aggregate's state saved at a stream version, so loading need not replay it all.

    `type` names the aggregate class and `schema_version` its state layout; a snapshot whose
    layout does not match the class is ignored, since the events remain the truth.
    """

    stream_id: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: str


@dataclass(frozen=True, slots=True)
class ProjectionState:
    """Where a projection stands: its live read model and, during a rebuild, the new one.

    `generation` numbers the copy of the read model that queries read; `position` is the last
    event applied to it. A blue/green rebuild fills `building_generation` up to
    `building_position`, then swaps it in as the live generation in one transaction.
    """

    name: str
    generation: int
    position: int
    updated_at: datetime | None = None
    building_generation: int | None = None
    building_position: int = 0

    def position_of(self, generation: int) -> int:
        """The checkpoint of the given generation (live or building)."""
        if generation == self.generation:
            return self.position
        if generation == self.building_generation:
            return self.building_position
        raise ProjectionConflict(self.name, f"generation {generation} is neither live nor building")


class DocumentNotLoaded(BaseException):
    """Raised by a document reader that can only read with `await` (PostgreSQL) for a key it
    has not loaded yet; the projection loads it and applies the event again.

    A `BaseException`, so a handler's own `except Exception` never swallows it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


class ProjectionConflict(TidingsError):
    """A projection checkpoint moved under a runner (another runner, or a swap): reload it."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"projection {name!r}: {detail}")


class StreamInfo(NamedTuple):
    """A stream id and its current version (its number of events)."""

    stream_id: str
    version: int


@runtime_checkable
class EventStore(Protocol):
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

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def append(
        self,
        stream_id: str,
        events: Iterable[Event],
        expected_version: ExpectedVersion = ANY,
        metadata: MetadataLike | None = None,
    ) -> AppendResult:
        """Append `events` to `stream_id` atomically: all are stored or none.

        `expected_version` is the version the writer last saw (`NO_STREAM` is 0), or `ANY`, or
        `STREAM_EXISTS`; a clash raises `WrongExpectedVersion`. Re-appending events whose ids
        are already stored, in this stream and in this order, stores nothing and returns the
        original result, whatever `expected_version` says (a safe retry).
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
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        """The global log after position `after` (exclusive), in position order.

        `types` keeps only those event types (classes or type names; older names that
        upcasters rename to them too). Reading again from the last position seen never skips
        an event committed since, nor repeats one. `keep_unknown` as for `read_stream`.
        """
        ...

    def subscribe(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
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
        """The position of the newest event in the global log, 0 when empty."""
        ...


def validate_stream_id(stream_id: object) -> str:
    """Return `stream_id` if it is storable; `InvalidStreamId` saying why if not."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(stream_id, f"must be a str, not {type(stream_id).__name__}")
    if not stream_id:
        raise InvalidStreamId(stream_id, "must not be empty")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(
            stream_id, f"{len(stream_id)} characters, over the limit of {MAX_STREAM_ID_LENGTH}"
        )
    try:
        stream_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidStreamId(stream_id, f"not valid unicode text ({exc.reason})") from None
    return stream_id


def _int64(value: int) -> int:
    """A position or version to look for, within the 64 bits stores keep them in: past the
    end, the end (no stored event is further), so every store answers alike."""
    return max(-(2**63), min(value, 2**63 - 1))


def _storable(metadata: Metadata) -> Metadata:
    """`metadata`, unless it holds a NUL character: PostgreSQL cannot keep one in JSON (its
    correlation index reads metadata as jsonb) and SQLite's JSON functions stop at one, so
    every store refuses it alike, before writing."""
    if metadata:
        texts = [metadata.correlation_id or "", metadata.causation_id or ""]
        texts += [*metadata.headers, *metadata.headers.values()]
        if any("\x00" in text for text in texts):
            raise InvalidMetadata("metadata cannot hold NUL characters (\\x00)")
    return metadata


def validate_expected(expected: object) -> ExpectedVersion:
    """Check the `expected_version` argument itself (not yet against the stream)."""
    if isinstance(expected, StreamState):
        return expected
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidExpectedVersion(expected)
    return expected


def expected_matches(expected: ExpectedVersion, actual: int) -> bool:
    """Whether a stream at version `actual` satisfies `expected`."""
    if expected is ANY:
        return True
    if expected is STREAM_EXISTS:
        return actual > 0
    return expected == actual


def type_names(types: Iterable[type[Event] | str] | None) -> frozenset[str] | None:
    """Normalise a `types=` filter to a set of type names."""
    if types is None:
        return None
    names = set()
    for item in types:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, Event) and item.__event_type__:
            names.add(item.__event_type__)
        else:
            raise TypeError(f"types= takes Event classes or type names, not {item!r}")
    return frozenset(names)


def resolve_duplicates(
    stream_id: str,
    ids: Sequence[Any],
    found: dict[Any, tuple[str, int, int]],
) -> AppendResult:
    """Decide a retry: `found` maps already-stored ids to (stream, version, position).

    The same events, in this stream, at consecutive versions in this order, are the original
    append: its result is returned. Anything else is an `EventIdConflict`.
    """
    for event_id in ids:
        if event_id in found and found[event_id][0] != stream_id:
            raise EventIdConflict(
                stream_id, event_id, f"already stored in stream {found[event_id][0]!r}"
            )
    missing = [event_id for event_id in ids if event_id not in found]
    if missing:
        stored = next(event_id for event_id in ids if event_id in found)
        raise EventIdConflict(
            stream_id,
            stored,
            f"already stored, but {len(missing)} of the {len(ids)} events in this append are not; "
            "a retry must resend exactly the original events",
        )
    versions = [found[event_id][1] for event_id in ids]
    if versions != list(range(versions[0], versions[0] + len(versions))):
        raise EventIdConflict(stream_id, ids[0], "stored, but not in this order as one append")
    return AppendResult(version=versions[-1], position=found[ids[-1]][2])


def advance_projection(
    current: ProjectionState | None,
    name: str,
    generation: int,
    expected_position: int,
    position: int,
    now: datetime,
) -> ProjectionState:
    """The checkpoint row after a commit, or `ProjectionConflict` if the commit is stale.

    Backends call this inside their transaction with the row they just read, so the rule
    for what may move a checkpoint lives in one place.
    """
    if current is None:
        if generation != 1 or expected_position != 0:
            raise ProjectionConflict(name, "has no checkpoint yet; a first commit starts at 0")
        return ProjectionState(name, 1, position, now)
    if position < expected_position:
        raise ProjectionConflict(name, f"a checkpoint cannot move back to {position}")
    actual = current.position_of(generation)
    if actual != expected_position:
        raise ProjectionConflict(
            name, f"generation {generation} is at {actual}, not {expected_position}"
        )
    if generation == current.generation:
        return dataclasses.replace(current, position=position, updated_at=now)
    return dataclasses.replace(current, building_position=position, updated_at=now)


def begin_rebuild(current: ProjectionState | None, name: str, now: datetime) -> ProjectionState:
    """The checkpoint row with a new, empty building generation."""
    if current is None:
        current = ProjectionState(name, 1, 0, now)
    newest = max(current.generation, current.building_generation or 0)
    return dataclasses.replace(
        current, building_generation=newest + 1, building_position=0, updated_at=now
    )


def swap_rebuild(
    current: ProjectionState | None, name: str, generation: int, now: datetime
) -> ProjectionState:
    """The checkpoint row once the rebuilt `generation` is live."""
    if current is None or current.building_generation != generation:
        raise ProjectionConflict(name, f"generation {generation} is not being rebuilt")
    return ProjectionState(name, generation, current.building_position, now)


_NO_KEYS: dict[str, bytes] = {}  # an append without personal values: nothing to seal


class AppendSignal:
    """Wakes waiting subscribers when this process appends; safe to notify from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    @property
    def seq(self) -> int:
        """Changes every time `notify` is called."""
        return self._seq

    def notify(self) -> None:
        """Wake every waiter (from any thread)."""
        with self._lock:
            self._seq += 1
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass

    async def wait(self, seen: int, timeout: float | None) -> None:
        """Return once `seq` differs from `seen`, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self._seq != seen:
                return
            self._waiters.add(entry)
        try:  # not asyncio.wait_for: on 3.11 it loses a cancel that races a wake-up
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


Row = Sequence[Any]
"""A stored event as a backend reads it: `(position, id, stream_id, version, type,
schema_version, recorded_at, data, metadata)`; `StoreBase` decodes it."""


class StoreBase(AsyncResource, ABC):
    """Shared behaviour of the store backends; see `EventStore` for the contract."""

    #: Whether other processes may append to the same store (then subscribers also poll).
    shared_across_processes: bool = False
    #: Polling backoff, first and longest wait, for stores shared across processes.
    poll_interval: tuple[float, float] = (0.01, 0.25)

    def __init__(
        self,
        *,
        codec: JSONCodec | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        batch_size: int = 1000,
    ) -> None:
        if max_event_size < 1 or batch_size < 1:
            raise ConfigurationError("max_event_size and batch_size must be positive")
        self.codec = codec or JSONCodec()
        self.max_event_size = max_event_size
        self.batch_size = batch_size
        self._signal = AppendSignal()
        self._opened = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Self:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} was closed; open a new one")
        if not self._opened:
            self.codec.registry.check()  # a gap in an upcaster chain fails here, at start-up
            await self._open()
            self._opened = True
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._signal.notify()
        if self._opened:
            await self._close()

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            state = (
                "closed"
                if self._closed
                else "not open yet (use `async with` or `await store.open()`)"
            )
            raise StoreClosed(f"{type(self).__name__} is {state}")

    # -- writing ---------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Iterable[Event],
        expected_version: ExpectedVersion = ANY,
        metadata: MetadataLike | None = None,
    ) -> AppendResult:
        stream_id = validate_stream_id(stream_id)
        expected = validate_expected(expected_version)
        if isinstance(events, (Event, str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise InvalidEvents(
                f"events must be a list of Event instances, not {type(events).__name__}"
            )
        if not isinstance(events, Sequence):
            events = list(events)  # a generator or set of events is fine, consumed once
        if not events:
            raise InvalidEvents(f"append to {stream_id!r} got no events")
        with telemetry.append_span(self, stream_id, len(events)) as span:
            meta = self.codec.encode_metadata(
                telemetry.traced(with_correlation(_storable(Metadata.coerce(metadata))), span)
            )
            keys = await self._keys_to_seal(events)
            encoded = self._encode(stream_id, events, len(meta.encode()) if meta else 0, keys)
            self._check_open()
            result = await self._append(stream_id, expected, encoded, meta)
            telemetry.appended(self, len(encoded), span, result)
        self._signal.notify()
        return result

    def _encode(
        self,
        stream_id: str,
        events: Sequence[Event],
        metadata_size: int,
        keys: Mapping[str, bytes] | None = None,
    ) -> list[EncodedEvent]:
        encoded = []
        seen = set()
        for index, event in enumerate(events):
            item = self.codec.encode(event, index, keys if keys is not None else _NO_KEYS)
            size = item.size + metadata_size  # each event is stored with its own copy
            if size > self.max_event_size:
                raise EventTooLarge(stream_id, index, item.type, size, self.max_event_size)
            if item.id in seen:
                raise EventIdConflict(
                    stream_id, item.id, f"events[{index}] repeats an event of this append"
                )
            seen.add(item.id)
            encoded.append(item)
        return encoded

    # -- reading ---------------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        start = _END_OF_STREAM if backwards else 1
        cursor = start if from_version is None else _int64(from_version)
        remaining = limit
        first = True
        while remaining is None or remaining > 0:
            size = self.batch_size if remaining is None else min(self.batch_size, remaining)
            if first:  # most streams are short: a small first batch is one cheap read
                size, first = min(size, FIRST_BATCH), False
            if backwards and cursor < 1:
                return
            batch = await self._read_stream_batch(stream_id, cursor, backwards, size)
            keys = await self._keys_to_open(batch)
            for record in self._decode(batch, keep_unknown, keys):
                yield record
            if len(batch) < size:
                return
            cursor = batch[-1][3] + (-1 if backwards else 1)  # the last row's version
            if remaining is not None:
                remaining -= len(batch)

    async def read_all(
        self,
        after: int = 0,
        *,
        limit: int | None = None,
        types: Iterable[type[Event] | str] | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        names = self.codec.registry.with_sources(type_names(types))
        after = max(0, _int64(after))  # positions count from 1
        self._check_open()
        remaining = limit

        def fetch(after: int) -> asyncio.Future[tuple[list[Row], int]]:
            size = self.batch_size if remaining is None else min(self.batch_size, remaining)
            return asyncio.ensure_future(self._read_all_batch(after, size, names))

        pending = fetch(after)
        try:
            while True:
                batch, scanned_to = await pending
                if remaining is not None:
                    remaining -= len(batch)
                more = scanned_to > after and (remaining is None or remaining > 0)
                if more:
                    pending = fetch(scanned_to)  # read ahead while the caller consumes
                after = scanned_to
                keys = await self._keys_to_open(batch)
                for record in self._decode(batch, keep_unknown, keys):
                    yield record
                if not more:
                    return
        finally:
            if not pending.done():
                pending.cancel()
            elif not pending.cancelled():
                pending.exception()  # a read ahead nobody will consume: retrieve, don't log

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        async for batch, _ in self.subscribe_batches(after, types=types, keep_unknown=keep_unknown):
            for record in batch:
                yield record

    async def stream_version(self, stream_id: str) -> int:
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        return await self._stream_version(stream_id)

    async def streams(self) -> AsyncIterator[StreamInfo]:
        self._check_open()
        after = ""  # sorts before every stream id, and no stream id is empty
        while True:
            batch = await self._streams_batch(after, self.batch_size)
            for info in batch:
                yield info
            if len(batch) < self.batch_size:
                return
            after = batch[-1].stream_id

    async def last_position(self) -> int:
        self._check_open()
        return await self._last_position()

    async def subscribe_batches(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
        limit: int | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[tuple[list[RecordedEvent[Any]], int]]:
        """`subscribe` a batch at a time: `(records, scanned_to)`, for consumers that commit
        per batch. With a `types` filter a batch may be empty while `scanned_to` moves on."""
        names = self.codec.registry.with_sources(type_names(types))
        after = max(0, _int64(after))  # positions count from 1
        size = limit or self.batch_size
        first_wait, longest_wait = self.poll_interval
        wait = first_wait
        while True:
            self._check_open()
            seen = self._signal.seq
            batch, scanned_to = await self._read_all_batch(after, size, names)
            if scanned_to > after:
                keys = await self._keys_to_open(batch)
                yield list(self._decode(batch, keep_unknown, keys)), scanned_to
                after = scanned_to
                wait = first_wait
                continue
            timeout = self._idle_wait(wait)
            await self._signal.wait(seen, timeout)
            if timeout is not None:
                wait = min(wait * 2, longest_wait)

    def _idle_wait(self, backoff: float) -> float | None:
        """How long a caught-up subscriber sleeps before reading again: until woken (None)
        when every append reaches it through this process, else the polling backoff."""
        return backoff if self.shared_across_processes else None

    # -- snapshots -------------------------------------------------------------------------

    async def save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        """Keep `data` as the state of `stream_id` at `version` (a later save of the same
        version replaces it)."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        await self._save_snapshot(stream_id, version, type, schema_version, data)

    async def read_snapshot(
        self,
        stream_id: str,
        *,
        max_version: int | None = None,
        recorded_until: datetime | None = None,
    ) -> Snapshot | None:
        """The newest snapshot of `stream_id` at or below `max_version` and taken no later
        than `recorded_until`; None when there is none."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        top = None if max_version is None else _int64(max_version)
        return await self._read_snapshot(stream_id, top, recorded_until)

    # -- projections: checkpoints and documents ---------------------------------------------

    async def projection_state(self, name: str) -> ProjectionState | None:
        """The checkpoint row of projection `name`, None before its first commit."""
        self._check_open()
        states = await self._projection_states(name)
        return states[0] if states else None

    async def projection_states(self) -> list[ProjectionState]:
        """Every projection's checkpoint row, by name."""
        self._check_open()
        return await self._projection_states(None)

    async def commit_projection(
        self,
        name: str,
        generation: int,
        expected_position: int,
        position: int,
        writes: Mapping[str, str | None],
    ) -> None:
        """Apply document `writes` (key to JSON, or None to delete) and move the checkpoint of
        `generation` from `expected_position` to `position`, in one transaction.

        A checkpoint that is no longer at `expected_position` (another runner got there, or a
        rebuild swapped generations) raises `ProjectionConflict` and changes nothing.
        """
        self._check_open()
        await self._commit_projection(name, generation, expected_position, position, writes)

    async def start_rebuild(self, name: str) -> ProjectionState:
        """Open a fresh, empty generation for `name` to be rebuilt into beside the live one."""
        self._check_open()
        return await self._start_rebuild(name)

    async def finish_rebuild(self, name: str, generation: int) -> None:
        """Make the rebuilt `generation` live and drop the old one, in one transaction."""
        self._check_open()
        await self._finish_rebuild(name, generation)

    async def get_document(self, name: str, key: str, generation: int | None = None) -> str | None:
        """One document of a projection's read model (the live generation by default)."""
        self._check_open()
        return (await self._get_documents(name, generation, [key])).get(key)

    async def documents(
        self, name: str, generation: int | None = None
    ) -> AsyncIterator[tuple[str, str]]:
        """Every `(key, document)` of a read model, by key, read in pages."""
        self._check_open()
        after = ""
        while True:
            batch = await self._documents_batch(name, generation, after, self.batch_size)
            for item in batch:
                yield item
            if len(batch) < self.batch_size:
                return
            after = batch[-1][0]

    def document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        """A synchronous lookup of committed documents, for handlers running in a batch."""
        self._check_open()
        return self._document_reader(name, generation)

    # -- leases ----------------------------------------------------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease `name` for `owner` for `ttl` seconds; False while another
        owner holds it unexpired. Workers use it so one of them runs each projection."""
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"a lease lasts a positive time, not {ttl}")
        return await self._acquire_lease(name, owner, ttl)

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up now (if `owner` holds it), so another worker takes over at once."""
        self._check_open()
        await self._release_lease(name, owner)

    def _decode(
        self,
        rows: list[Row],
        keep_unknown: bool = False,
        keys: Mapping[str, bytes] | None = None,
    ) -> Iterator[RecordedEvent[Any]]:
        codec = self.codec
        if keep_unknown and not codec.keep_unknown:  # this read asked for raw UnknownEvents
            codec = self._keeping = getattr(self, "_keeping", None) or JSONCodec(
                codec.registry, keep_unknown=True
            )
        return codec.iter_rows(rows, id_of=self._id_of, time_of=self._time_of, keys=keys)

    # -- tracing ----------------------------------------------------------------------------

    async def read_correlation(
        self, correlation_id: str, *, limit: int = 10_000
    ) -> list[RecordedEvent[Any]]:
        """Every event of one correlation (a request and all it caused), in position order,
        at most `limit`; types without a class arrive as `UnknownEvent`. Indexed on SQLite
        and PostgreSQL; a scan of the log on the memory store."""
        self._check_open()
        rows = await self._correlation_rows(correlation_id, limit)
        keys = await self._keys_to_open(rows)
        return list(self._decode(rows, True, keys))

    async def _correlation_rows(self, correlation_id: str, limit: int) -> list[Row]:
        """The rows of one correlation; this default scans the log (backends index it)."""
        found: list[Row] = []
        after = 0
        needle = json.dumps(correlation_id, ensure_ascii=False)[1:-1]
        while len(found) < limit:
            batch, scanned = await self._read_all_batch(after, self.batch_size, None)
            for row in batch:
                meta = row[8]
                if (
                    meta
                    and needle in meta  # as the stored JSON writes it (quotes escaped)
                    and json.loads(meta).get("correlation_id") == correlation_id
                ):
                    found.append(row)
            if scanned <= after:
                break
            after = scanned
        return found[:limit]

    # -- personal data ----------------------------------------------------------------------

    async def forget(self, subject: str) -> None:
        """Forget a data subject: delete the key its personal fields were encrypted with, so
        they read `REDACTED` everywhere from now on (the events stay, in place). Snapshots are
        dropped too (they are caches and may hold the data in clear); rebuild read models
        that copied it. A new event about the subject later gets a new key."""
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"a data subject is a non-empty string, not {subject!r}")
        self._check_open()
        await self._forget(subject)

    async def _keys_to_seal(self, events: Sequence[Event]) -> dict[str, bytes] | None:
        """The keys of the subjects of these events' personal fields (made when new)."""
        subjects = {
            str(getattr(event, subject))
            for event in events
            if isinstance(event, Event)
            for field, subject in event.__personal__.items()
            if getattr(event, field) is not None
        }
        if not subjects:
            return None
        self._check_open()
        return await self._subject_keys(subjects, create=True)

    async def _keys_to_open(self, rows: list[Row]) -> dict[str, bytes] | None:
        """The keys for the sealed personal values in these rows (a forgotten one is absent);
        None at once when no class this store decodes has personal fields."""
        if not self.codec.registry.personal:
            return None
        subjects: set[str] = set()
        for row in rows:
            data = row[7]
            text = data if isinstance(data, str) else bytes(data).decode()
            if PREFIX in text:
                subjects |= subjects_in(text)
        if not subjects:
            return None
        return await self._subject_keys(subjects, create=False)

    # -- backend primitives ----------------------------------------------------------------

    #: How the backend's rows hold the id and the time, when not as `UUID` and `datetime`.
    _id_of: Callable[[Any], UUID] | None = None
    _time_of: Callable[[Any], datetime] | None = None

    @abstractmethod
    async def _open(self) -> None:
        """Connect and make the schema current."""

    @abstractmethod
    async def _close(self) -> None:
        """Release every connection and thread."""

    @abstractmethod
    async def _append(
        self,
        stream_id: str,
        expected: ExpectedVersion,
        events: list[EncodedEvent],
        metadata: str | None,
    ) -> AppendResult:
        """Store validated, encoded events atomically, checking `expected` and retries."""

    @abstractmethod
    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        """Up to `limit` rows of a stream from `from_version` (inclusive) in the direction."""

    @abstractmethod
    async def _read_all_batch(
        self, after: int, limit: int, types: frozenset[str] | None
    ) -> tuple[list[Row], int]:
        """Up to `limit` matching rows after `after`, and the last position scanned.

        The scanned position may pass events filtered out by `types`, so the next batch
        starts beyond them; it equals `after` only when nothing newer exists.
        """

    @abstractmethod
    async def _stream_version(self, stream_id: str) -> int:
        """The stream's version, 0 when it has no events."""

    @abstractmethod
    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        """Up to `limit` streams whose ids sort after `after`, in stream id order."""

    @abstractmethod
    async def _last_position(self) -> int:
        """The newest position, 0 when the log is empty."""

    @abstractmethod
    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        """Store one snapshot, replacing one at the same version."""

    @abstractmethod
    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        """The newest snapshot within the bounds, or None."""

    @abstractmethod
    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        """The checkpoint row of `name`, or of every projection when None."""

    @abstractmethod
    async def _commit_projection(
        self,
        name: str,
        generation: int,
        expected_position: int,
        position: int,
        writes: Mapping[str, str | None],
    ) -> None:
        """Write documents and move a checkpoint atomically; `ProjectionConflict` if moved.

        The first commit of a projection (no row yet) creates it at generation 1."""

    @abstractmethod
    async def _start_rebuild(self, name: str) -> ProjectionState:
        """Set `building_generation` to a new, empty generation at position 0."""

    @abstractmethod
    async def _finish_rebuild(self, name: str, generation: int) -> None:
        """Swap `generation` in as live with its checkpoint; delete the old documents."""

    @abstractmethod
    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        """The stored documents among `keys` (live generation when None)."""

    @abstractmethod
    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        """Up to `limit` documents whose keys sort after `after`, by key."""

    @abstractmethod
    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        """A synchronous, cheap lookup of committed documents of one generation."""

    @abstractmethod
    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        """The keys of these data subjects; with `create`, new ones for those without."""

    @abstractmethod
    async def _forget(self, subject: str) -> None:
        """Delete the subject's key and every snapshot, leaving no copy on disk."""

    @abstractmethod
    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Atomically: take the lease if free, expired or already `owner`'s; report success."""

    @abstractmethod
    async def _release_lease(self, name: str, owner: str) -> None:
        """Delete the lease if `owner` holds it."""


def url_options(url: str, known: dict[str, type]) -> dict[str, Any]:
    """The query parameters of `url`, converted to the types in `known`.

    An unknown parameter or a bad value is a `ConfigurationError` naming it.
    """
    options: dict[str, Any] = {}
    for key, raw in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in known:
            raise ConfigurationError(
                f"unknown option {key!r} in {url!r}; known: {', '.join(sorted(known)) or 'none'}"
            )
        kind = known[key]
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                options[key] = raw.lower() in ("1", "true", "yes")
            else:
                options[key] = kind(raw)
        except ValueError:
            raise ConfigurationError(
                f"option {key}={raw!r} in {url!r} is not a valid {kind.__name__}"
            ) from None
    return options
