"""Handing out queued messages in key order: one key at a time, in publish order.

The in-memory broker and the adapters that keep their own buffer of fetched messages
(Kafka, Redis, SQS) pick the next one with `next_in_key_order`, and wait for more with
`wait_set`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Protocol, TypeVar

from tidings.brokers.envelope import Message

__all__ = ["next_in_key_order", "wait_set"]


class _Queued(Protocol):
    """What `next_in_key_order` reads of an adapter's queued entry."""

    @property
    def message(self) -> Message: ...
    @property
    def not_before(self) -> float: ...  # when a nacked message may go again
    @property
    def holder(self) -> object: ...  # falsy while nobody has it


E = TypeVar("E", bound=_Queued)


def next_in_key_order(entries: Iterable[E], now: float) -> tuple[E | None, float | None]:
    """The first entry that may go out now, and when to look again if none.

    `entries` are in publish order, each with a `message`, a `not_before` time and a
    `holder` (falsy when nobody has it). An entry waits while an earlier one of its key is
    held or waiting for a retry, so one key goes out in order and never twice at once.
    """
    blocked: set[str] = set()
    soonest: float | None = None
    for entry in entries:
        key = entry.message.key
        if key is not None and key in blocked:
            continue
        if not entry.holder:
            if entry.not_before <= now:
                return entry, None
            soonest = entry.not_before if soonest is None else min(soonest, entry.not_before)
        if key is not None:
            blocked.add(key)  # in flight or waiting: later ones of this key wait too
    return None, soonest


async def wait_set(event: asyncio.Event, timeout: float | None) -> None:
    """Wait at most `timeout` seconds (None: no limit) for `event`; return either way."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
