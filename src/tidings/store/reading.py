"""Reading: one stream, the global log, the stream list and the newest position, in batches.

Paging lives here once (a small first batch for short streams, reading the next batch of the
log ahead while the caller consumes the last), so backends only answer one batch at a time.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterable
from typing import Any

from tidings.core.events import Event
from tidings.core.query import Query, Selection
from tidings.core.recorded import RecordedEvent
from tidings.store.contracts import QueryResult, Row, StreamInfo
from tidings.store.personal import PersonalData
from tidings.store.validation import _int64, type_names, validate_stream_id

__all__ = ["FIRST_BATCH", "Reading"]

_END_OF_STREAM = 2**62  # a version above any real one: "from the last event", backwards
FIRST_BATCH = 128  # rows in the first batch of a stream read


class Reading(PersonalData):
    """`read_stream`, `read_all`, `stream_version`, `streams` and `last_position`."""

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
        query: Query | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        selection = self._selection(types, query)
        after = max(0, _int64(after))  # positions count from 1
        self._check_open()
        remaining = limit

        def fetch(after: int) -> asyncio.Future[tuple[list[Row], int]]:
            size = self.batch_size if remaining is None else min(self.batch_size, remaining)
            return asyncio.ensure_future(self._read_all_batch(after, size, selection))

        pending = fetch(after)
        try:
            while True:
                batch, scanned_to = await pending
                full = len(batch) == (
                    self.batch_size if remaining is None else min(self.batch_size, remaining)
                )
                if remaining is not None:
                    remaining -= len(batch)
                # A short batch is the end of what is readable now (a backend fills a
                # batch when it can): no read ahead, no second round trip for nothing.
                more = full and scanned_to > after and (remaining is None or remaining > 0)
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

    async def read_query(
        self, query: Query, after: int = 0, *, keep_unknown: bool = False
    ) -> QueryResult:
        if not isinstance(query, Query):
            raise TypeError(f"read_query takes a Query, not {query!r}")
        selection = self._selection(None, query)
        head = after = max(0, _int64(after))
        self._check_open()
        events: list[RecordedEvent[Any]] = []
        size = min(self.batch_size, FIRST_BATCH)  # a decision reads a few events: one cheap read
        while True:
            batch, head = await self._read_all_batch(head, size, selection)
            keys = await self._keys_to_open(batch)
            events.extend(self._decode(batch, keep_unknown, keys))
            if len(batch) < size:
                return QueryResult(events, max(head, after))
            size = self.batch_size

    def _selection(
        self, types: Iterable[type[Event] | str] | None, query: Query | None
    ) -> Selection | None:
        """The `types=` filter and the `query=` together (both must hold), as the backend
        reads them; None when they select every event."""
        if query is not None and not isinstance(query, Query):
            raise TypeError(f"query= takes a Query, not {query!r}")
        return Selection.of(query, self.codec.registry, type_names(types))

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

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        """Up to `limit` rows of a stream from `from_version` (inclusive) in the direction."""

    @abstractmethod
    async def _read_all_batch(
        self, after: int, limit: int, selection: Selection | None
    ) -> tuple[list[Row], int]:
        """Up to `limit` rows after `after` that `selection` selects (None: all), and the
        last position scanned. Fewer than `limit` rows means nothing more is readable now.

        The scanned position may pass events the selection leaves out, so the next batch
        starts beyond them; it equals `after` only when nothing newer exists. A selection
        with tags or types reads an index, not the log.
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
