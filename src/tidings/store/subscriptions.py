"""Subscriptions: read the log to its end, then wait for new events instead of ending.

An append in this process wakes a waiting subscriber at once (`AppendSignal`); a store shared
with other processes also polls, backing off while idle, so nothing spins the CPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from tidings.core.events import Event
from tidings.core.query import Query
from tidings.core.recorded import RecordedEvent
from tidings.store.reading import Reading
from tidings.store.validation import _int64

__all__ = ["Subscriptions"]


class Subscriptions(Reading):
    """`subscribe` and `subscribe_batches`: the catch-up-then-wait loop."""

    #: Whether other processes may append to the same store (then subscribers also poll).
    shared_across_processes: bool = False
    #: Polling backoff, first and longest wait, for stores shared across processes.
    poll_interval: tuple[float, float] = (0.01, 0.25)

    async def subscribe(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
        query: Query | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent[Any]]:
        batches = self.subscribe_batches(after, types=types, query=query, keep_unknown=keep_unknown)
        async for batch, _ in batches:
            for record in batch:
                yield record

    async def subscribe_batches(
        self,
        after: int = 0,
        *,
        types: Iterable[type[Event] | str] | None = None,
        query: Query | None = None,
        limit: int | None = None,
        keep_unknown: bool = False,
    ) -> AsyncIterator[tuple[list[RecordedEvent[Any]], int]]:
        """`subscribe` a batch at a time: `(records, scanned_to)`, for consumers that commit
        per batch. With a `types` or `query` filter a batch may be empty while `scanned_to`
        moves on."""
        selection = self._selection(types, query)
        after = max(0, _int64(after))  # positions count from 1
        size = limit or self.batch_size
        first_wait, longest_wait = self.poll_interval
        wait = first_wait
        while True:
            self._check_open()
            seen = self._signal.seq
            batch, scanned_to = await self._read_all_batch(after, size, selection)
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
