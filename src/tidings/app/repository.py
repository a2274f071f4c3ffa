"""`Repository`: load aggregates from their streams and save what they recorded.

One aggregate is one stream, `"<category>-<id>"`. `save` appends the pending events with the
loaded version as the expected version, so two writers racing on one aggregate cannot both
win: the second gets `WrongExpectedVersion`, and `update` turns that into reload-and-retry.
With `snapshot_every=N` the state is also saved every N events; loading then reads the newest
usable snapshot and only the events after it, so its cost does not grow with the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from tidings.app.aggregate import Aggregate
from tidings.core.errors import (
    AggregateNotFound,
    ConfigurationError,
    StoreError,
    WrongExpectedVersion,
)
from tidings.core.metadata import MetadataLike
from tidings.store.base import AppendResult, EventStore, StoreBase

__all__ = ["Repository"]

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("tidings.repository")


class Repository(Generic[A]):
    """Loads and saves one aggregate class in one store.

    Args:
        store: the event store (opened).
        aggregate: the `Aggregate` subclass.
        category: the stream id prefix; defaults to the class's `category`.
        snapshot_every: save a snapshot whenever a save crosses a multiple of this many
            events; None (the default) never snapshots.
    """

    def __init__(
        self,
        store: EventStore,
        aggregate: type[A],
        *,
        category: str | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        if not (isinstance(aggregate, type) and issubclass(aggregate, Aggregate)):
            raise ConfigurationError(f"Repository needs an Aggregate subclass, not {aggregate!r}")
        if snapshot_every is not None and snapshot_every < 1:
            raise ConfigurationError(f"snapshot_every must be at least 1, not {snapshot_every}")
        self.store = store
        self.aggregate = aggregate
        self.category = category or aggregate.__category__
        self.snapshot_every = snapshot_every

    def stream_id(self, aggregate_id: Any) -> str:
        """The stream that holds the aggregate with this id."""
        return f"{self.category}-{aggregate_id}"

    # -- writing ---------------------------------------------------------------------------

    async def save(
        self, aggregate: A, *, metadata: MetadataLike | None = None
    ) -> AppendResult | None:
        """Append the aggregate's pending events atomically and clear them.

        The expected version is the one it was loaded at, so a concurrent save in between
        raises `WrongExpectedVersion` and stores nothing. Returns None when nothing was pending.
        """
        pending = aggregate._pending
        if not pending:
            return None
        expected = aggregate.version - len(pending)
        result = await self.store.append(
            self.stream_id(aggregate.id), list(pending), expected, metadata
        )
        aggregate._pending = []
        every = self.snapshot_every
        if every is not None and result.version // every > expected // every:
            await self._snapshot(aggregate)
        return result

    async def update(
        self,
        aggregate_id: Any,
        change: Callable[[A], Awaitable[Any] | Any],
        *,
        retries: int = 3,
        metadata: MetadataLike | None = None,
    ) -> A:
        """Load, apply `change` (sync or async), save; on a conflict, reload and try again.

        Gives up after `retries` further attempts, raising the last `WrongExpectedVersion`.
        Domain errors from `change` propagate at once, with nothing saved.
        """
        attempt = 0
        while True:
            aggregate = await self.get(aggregate_id)
            outcome = change(aggregate)
            if isinstance(outcome, Awaitable):
                await outcome
            try:
                await self.save(aggregate, metadata=metadata)
            except WrongExpectedVersion:
                attempt += 1
                if attempt > retries:
                    raise
                continue
            return aggregate

    # -- reading ---------------------------------------------------------------------------

    async def get(
        self,
        aggregate_id: Any,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
    ) -> A:
        """The aggregate now, right after event `version`, or as it was at `as_of`.

        `AggregateNotFound` when the stream has no events (or none by that version or moment).
        """
        if version is not None and (isinstance(version, bool) or version < 1):
            raise ValueError(f"version must be 1 or more, not {version!r}")
        until = None if as_of is None else _aware(as_of)
        stream_id = self.stream_id(aggregate_id)
        aggregate = self.aggregate(aggregate_id)
        start = await self._restore(aggregate, stream_id, version, until)
        limit = None if version is None else version - aggregate.version
        if limit != 0:
            async for record in self.store.read_stream(stream_id, start, limit=limit):
                if until is not None and record.recorded_at > until:
                    break
                aggregate._apply_recorded(record)
                aggregate.version = record.version
        if aggregate.version == 0:
            detail = ""
            if until is not None:
                detail = f"as of {until.isoformat()}"
            raise AggregateNotFound(
                self.aggregate.__qualname__, str(aggregate_id), stream_id, detail
            )
        if version is not None and aggregate.version < version:
            raise AggregateNotFound(
                self.aggregate.__qualname__,
                str(aggregate_id),
                stream_id,
                f"at version {version} (it has {aggregate.version} events)",
            )
        if (
            self.snapshot_every is not None
            and version is None
            and until is None
            and aggregate.version - start + 1 > self.snapshot_every
        ):
            await self._snapshot(aggregate)  # no usable snapshot (a new layout): make one
        return aggregate

    async def exists(self, aggregate_id: Any) -> bool:
        """Whether the aggregate's stream has any events."""
        return await self.store.stream_version(self.stream_id(aggregate_id)) > 0

    # -- snapshots -------------------------------------------------------------------------

    async def _restore(
        self, aggregate: A, stream_id: str, version: int | None, until: datetime | None
    ) -> int:
        """Load the newest usable snapshot into `aggregate`; the version to read on from."""
        if self.snapshot_every is None or not isinstance(self.store, StoreBase):
            return 1
        snapshot = await self.store.read_snapshot(
            stream_id, max_version=version, recorded_until=until
        )
        cls = self.aggregate
        if (
            snapshot is None
            or snapshot.type != cls.__qualname__
            or snapshot.schema_version != cls.__snapshot_version__
        ):
            return 1  # none, or another layout: the events are the truth
        aggregate._load_snapshot(snapshot.data)
        aggregate.version = snapshot.version
        return snapshot.version + 1

    async def _snapshot(self, aggregate: A) -> None:
        if not isinstance(self.store, StoreBase):
            return
        cls = type(aggregate)
        try:
            await self.store.save_snapshot(
                self.stream_id(aggregate.id),
                aggregate.version,
                cls.__qualname__,
                cls.__snapshot_version__,
                aggregate._dump_snapshot(),
            )
        except StoreError as exc:  # the events are stored; a missing snapshot only costs time
            log.warning("could not save a snapshot of %s: %s", self.stream_id(aggregate.id), exc)


def _aware(moment: datetime) -> datetime:
    """A naive datetime is read as local time, as `datetime.astimezone` does."""
    return moment.astimezone(UTC)
