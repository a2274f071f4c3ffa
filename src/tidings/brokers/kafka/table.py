"""A compacted Kafka topic read as a map: the dead letters and the delivery counts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped]
    TopicPartition,
)

from tidings.brokers.kafka.errors import _DOWN, _error

if TYPE_CHECKING:
    from tidings.brokers.kafka.broker import KafkaBroker


class _Table:
    """A compacted topic of one partition read as a map: a record sets its key, a record
    without a value removes it. The first read starts at the beginning, later ones go on
    from where the last stopped, up to the end the topic had when the read began."""

    def __init__(
        self, broker: KafkaBroker, topic: str, apply: Callable[[str, bytes | None], None]
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.apply = apply
        self.reader: Any = None
        self.positions: dict[Any, int] = {}  # TopicPartition -> the next offset to read
        self.lock = asyncio.Lock()

    async def put(self, key: str, value: bytes | None) -> None:
        await self.put_many({key: value})

    async def put_many(self, items: Mapping[str, bytes | None]) -> None:
        """Write several keys in one round trip; this process sees them at once."""
        await self.broker._ensure_topic(self.topic, compacted=True)
        await self.broker._send(self.topic, [(k.encode(), v, []) for k, v in items.items()])
        for key, value in items.items():
            self.apply(key, value)

    async def read(self) -> None:
        async with self.lock:
            try:
                async with asyncio.timeout(self.broker.request_timeout):
                    await self._read()
            except _DOWN as exc:
                raise _error(f"cannot read {self.topic!r}", exc) from exc

    async def _read(self) -> None:
        reader = self.reader
        if reader is None:
            await self.broker._ensure_topic(self.topic, compacted=True)
            reader = self.broker._consumer(None)
            try:
                await reader.start()
                numbers = await self.broker._producer.partitions_for(self.topic)
                partitions = [TopicPartition(self.topic, n) for n in sorted(numbers)]
                reader.assign(partitions)
            except BaseException:
                with contextlib.suppress(*_DOWN):
                    await reader.stop()
                raise
            self.reader = reader
            # Explicit positions: a reset to "earliest" on an empty topic can stall on
            # some brokers, and a position we set needs no round trip to look up.
            self.positions = {tp: 0 for tp in partitions}
        ends = await reader.end_offsets(list(self.positions))
        for tp, position in self.positions.items():
            reader.seek(tp, position)
        while True:
            behind = [tp for tp, at in self.positions.items() if at < ends[tp]]
            if not behind:
                return
            batches = await reader.getmany(*behind, timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if record.key is not None:
                        self.apply(record.key.decode("utf-8", "replace"), record.value)
                # Compaction leaves gaps: where the reader stands, not the last offset + 1.
                self.positions[tp] = await reader.position(tp)

    async def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            with contextlib.suppress(*_DOWN):
                async with asyncio.timeout(self.broker.request_timeout):
                    await reader.stop()
