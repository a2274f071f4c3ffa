"""`MemoryBroker`: the broker semantics inside one process, for tests and demos (`memory://`).

The same rules as the real adapters: each declared group of a topic gets every message;
members of a group compete; a key is never in two members' hands at once and its messages
go out in publish order; unacked messages of a member that leaves go to another; a nack
with a delay holds the message (and the rest of its key) back until then.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tidings.brokers.base import BrokerBase
from tidings.brokers.dead_letters import DeadLetter
from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import next_in_key_order, wait_set
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError

__all__ = ["MemoryBroker"]


@dataclass(eq=False)
class _Entry:
    seq: int
    message: Message
    attempt: int = 0
    not_before: float = 0.0
    holder: str | None = None


@dataclass(eq=False)
class _Group:
    entries: list[_Entry] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.changed.set()

    def next_for(self, member: str, now: float) -> tuple[_Entry | None, float | None]:
        """The first message this member may take now, and when to look again if none."""
        held = {entry for entry in self.entries if entry.holder is not None}
        return next_in_key_order(self.entries, held, now)


class _Received(Received):
    def __init__(self, group: _Group, entry: _Entry) -> None:
        super().__init__(entry.message, entry.attempt)
        self.group, self.entry = group, entry

    async def ack(self) -> None:
        if self.entry in self.group.entries:
            self.group.entries.remove(self.entry)
        self.group.wake()

    async def nack(self, delay: float | None) -> None:
        self.entry.holder = None
        self.entry.not_before = time.monotonic() + (delay or 0.0)
        self.group.wake()


class MemoryBroker(BrokerBase):
    """A broker in this process's memory; nothing survives it."""

    def __init__(
        self, url: str = "memory://", *, codec: JSONCodec | None = None, source: str = "tidings"
    ) -> None:
        super().__init__(codec=codec, source=source)
        self.url = url
        self._topics: dict[str, dict[str, _Group]] = {}
        self._dead: list[DeadLetter] = []
        self._seq = itertools.count(1)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryBroker:
        if url.split("?", 1)[0] not in ("memory://", "memory:", "memory:///"):
            raise ConfigurationError(f"a memory broker URL is just 'memory://', got {url!r}")
        return cls(url, **options)

    async def _open(self) -> None:
        pass

    async def _close(self) -> None:
        for groups in self._topics.values():
            for group in groups.values():
                group.wake()

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        for group in self._topics.get(topic, {}).values():
            group.entries.extend(_Entry(next(self._seq), m) for m in messages)
            group.wake()

    async def _declare(self, topic: str, group: str) -> None:
        self._topics.setdefault(topic, {}).setdefault(group, _Group())

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        state = self._topics[topic][group]
        while not self._closed:
            held = sum(1 for e in state.entries if e.holder == member)
            entry, soonest = (
                state.next_for(member, time.monotonic())
                if held < prefetch
                else (
                    None,
                    None,
                )
            )
            if entry is None:
                state.changed.clear()
                timeout = None if soonest is None else max(0.0, soonest - time.monotonic())
                await wait_set(state.changed, timeout)
                continue
            entry.holder = member
            entry.attempt += 1
            yield _Received(state, entry)

    async def _leave(self, topic: str, group: str, member: str) -> None:
        state = self._topics.get(topic, {}).get(group)
        if state is None:
            return
        for entry in state.entries:
            if entry.holder == member:
                entry.holder = None
        state.wake()

    async def _redeliver(self, dead: DeadLetter) -> None:
        await self._declare(dead.topic, dead.group)
        state = self._topics[dead.topic][dead.group]
        state.entries.append(_Entry(next(self._seq), dead.message))
        state.wake()

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        self._dead.append(dead)

    async def _dead_letters(self) -> list[DeadLetter]:
        return list(self._dead)

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        self._dead = [d for d in self._dead if d.id != dead_letter_id]
