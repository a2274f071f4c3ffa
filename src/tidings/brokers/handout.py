"""Handing out fetched messages in key order: one key at a time, in publish order, within a
member's `prefetch`.

Every adapter that keeps a buffer of fetched messages (Kafka, Redis, RabbitMQ, SQS) keeps
it in a `HandOut`: entries by lane (a partition, a shard, a queue) in publish order, the
ones handed out and not settled, and an event that says something changed. The adapter
decides what a lane is and what settling means on its broker; the `HandOut` decides what
may go out next. The in-memory broker uses `next_in_key_order` on its shared queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Container, Hashable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from tidings.brokers.envelope import Message

__all__ = ["HandOut", "next_in_key_order", "wait_set"]


class _Queued(Protocol):
    """What the hand-out reads and writes of an adapter's buffered entry."""

    message: Message
    not_before: float  # when a nacked message may go again (the hand-out's clock)


E = TypeVar("E", bound=_Queued)
K = TypeVar("K", bound=Hashable)  # what names a lane: a partition, a shard number, a queue


def next_in_key_order(
    entries: Iterable[E], held: Container[E], now: float
) -> tuple[E | None, float | None]:
    """The first entry that may go out now, and when to look again if none.

    `entries` are in publish order; `held` are those handed out and not settled. An entry
    waits while an earlier one of its key is held or waiting for a retry, so one key goes
    out in order and never twice at once.
    """
    blocked: set[str] | None = None  # made when first needed: usually the first entry goes
    soonest: float | None = None
    for entry in entries:
        key = entry.message.key
        if blocked and key is not None and key in blocked:
            continue
        if entry not in held:
            if entry.not_before <= now:
                return entry, None
            soonest = entry.not_before if soonest is None else min(soonest, entry.not_before)
        if key is not None:  # in flight or waiting: later ones of this key wait too
            if blocked is None:
                blocked = set()
            blocked.add(key)
    return None, soonest


async def wait_set(event: asyncio.Event, timeout: float | None) -> None:
    """Wait at most `timeout` seconds (None: no limit) for `event`; return either way."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


class HandOut(Generic[K, E]):
    """One member's fetched entries by lane, handed out in key order within `prefetch`.

    Lanes take turns, so a busy partition or shard does not starve the others. An entry
    stays in its lane while it is held, which keeps the rest of its key waiting; `finish`
    removes it, `retry` lets it go again after a delay, in its place.
    """

    def __init__(self, prefetch: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.prefetch = max(1, prefetch)
        self.clock = clock
        self.lanes: dict[K, list[E]] = {}
        self.holding: set[E] = set()  # handed out, not settled yet
        self.changed = asyncio.Event()  # an entry came, or one was settled
        self._turn = 0

    @property
    def room(self) -> int:
        """How many more entries may be handed out before some are settled."""
        return self.prefetch - len(self.holding)

    def lane(self, name: K) -> list[E]:
        """A lane's entries (a new, empty lane if it has none yet)."""
        return self.lanes.setdefault(name, [])

    def add(self, name: K, entry: E) -> None:
        self.lane(name).append(entry)
        self.wake()

    def order(self, *, advance: bool = True) -> list[K]:
        """The lanes in this turn's order; with `advance`, the next call starts one later."""
        names = list(self.lanes)
        if not names:
            return names
        if advance:
            self._turn = (self._turn + 1) % len(names)
        first = self._turn % len(names)
        return names[first:] + names[:first]

    def candidates(
        self, now: float, *, advance: bool = True
    ) -> Iterator[tuple[K, E | None, float | None]]:
        """Each non-empty lane's next entry in key order (or when to look again), lanes
        taking turns."""
        for name in self.order(advance=advance):
            entries = self.lanes[name]
            if entries:
                entry, when = next_in_key_order(entries, self.holding, now)
                yield name, entry, when

    def next(self, now: float | None = None) -> tuple[E | None, float | None]:
        """The entry to hand out now, or when to look again (None: when something changes)."""
        if self.room <= 0:
            return None, None
        soonest: float | None = None
        for _, entry, when in self.candidates(self.clock() if now is None else now):
            if entry is not None:
                return entry, None
            if when is not None:
                soonest = when if soonest is None else min(soonest, when)
        return None, soonest

    def take(self, entry: E) -> E:
        """`entry` is handed out: the rest of its key waits until it is settled."""
        self.holding.add(entry)
        return entry

    def held(self, entry: E) -> bool:
        return entry in self.holding

    def release(self, entry: E) -> bool:
        """`entry` is no longer held (settled, or taken back); False if it was not held."""
        held = entry in self.holding
        self.holding.discard(entry)
        self.wake()
        return held

    def retry(self, entry: E, delay: float | None) -> None:
        """Hand `entry` out again after `delay` seconds, before the rest of its key."""
        self.release(entry)
        entry.not_before = self.clock() + (delay or 0.0)

    def finish(self, name: K, entry: E) -> None:
        """`entry` is done: out of its lane, and no longer held."""
        self.release(entry)
        entries = self.lanes.get(name)
        if entries is not None and entry in entries:
            entries.remove(entry)

    def drop(self, name: K) -> list[E]:
        """Take a lane away (given up, or lost); its entries, held ones included."""
        entries = self.lanes.pop(name, [])
        self.wake()
        return entries

    def wake(self) -> None:
        self.changed.set()

    async def wait(self, timeout: float | None) -> None:
        """Wait until something changes, at most `timeout` seconds (None: no limit)."""
        self.changed.clear()
        await wait_set(self.changed, timeout)
