"""One member of a consumer group: the records it fetched, handed out in key order within
`prefetch`, committed up to the longest acked prefix, counted ahead in the attempts table,
and handed over on a rebalance."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import OffsetAndMetadata  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
)

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import HandOut, next_in_key_order
from tidings.brokers.kafka.errors import _DOWN, KafkaBrokerError, _error
from tidings.brokers.kafka.group import _leave_generation_zero, _Listener
from tidings.brokers.kafka.offsets import OffsetTracker
from tidings.brokers.kafka.records import _REPLAY_HEADER, encode_attempts, from_record
from tidings.core.errors import BrokerError

if TYPE_CHECKING:
    from tidings.brokers.kafka.broker import KafkaBroker

log = logging.getLogger(__name__)

_BUFFER = 256  # records a member keeps per partition before pausing it
_POLL_MS = 1000  # longest wait of one fetch, so a member looks around now and then


@dataclass(eq=False)
class _Entry:
    offset: int
    message: Message
    attempts: int  # deliveries so far, carried over from the previous owner
    marked: int = 0  # deliveries the attempts table already counts (written ahead)
    holder: _KafkaReceived | None = None
    not_before: float = 0.0  # monotonic; a nacked entry waits until then


@dataclass(eq=False)
class _Partition:
    tp: Any  # TopicPartition
    carried: dict[int, int]  # offset -> deliveries the previous owner made
    entries: list[_Entry] = field(default_factory=list)
    offsets: OffsetTracker = field(default_factory=lambda: OffsetTracker())
    paused: bool = False
    gone: bool = False  # revoked, or its member left: acks no longer commit
    mark_from: int = 0  # offsets from here on are not counted ahead yet


class _Consumer:
    """One member: an `AIOKafkaConsumer` in the group, the records it fetched and holds."""

    def __init__(
        self, broker: KafkaBroker, topic: str, group: str, group_id: str, prefetch: int
    ) -> None:
        self.broker, self.topic, self.group, self.group_id = broker, topic, group, group_id
        self.consumer: Any = None  # the AIOKafkaConsumer, once started
        self.partitions: dict[Any, _Partition] = {}
        self.handout: HandOut[Any, _Entry] = HandOut(prefetch)  # a lane per partition
        self.changed = self.handout.changed  # something to hand out, or room to hand it out
        self.settled = asyncio.Event()  # a held record was acked or nacked
        self.left = False
        self.epoch = 0  # bumped on every revocation
        self.pump: asyncio.Task[None] | None = None
        self.marking: asyncio.Task[None] | None = None
        self.ahead = 0  # records waiting whose next delivery is counted already
        self.unmarked = False  # some waiting record's next delivery is not counted yet
        self.commit_lock = asyncio.Lock()
        self.to_commit: dict[Any, Any] = {}  # TopicPartition -> OffsetAndMetadata
        self.committed: dict[Any, int] = {}

    async def start(self) -> None:
        self.consumer = self.broker._consumer(self.group_id)
        try:
            async with asyncio.timeout(self.broker.connect_timeout):
                await self.consumer.start()
        except _DOWN as exc:
            await self.stop_client()
            address = self.broker.address
            raise _error(f"cannot join {self.group!r} on Kafka at {address}", exc) from exc
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        self.pump = asyncio.create_task(self._pump(), name=f"kafka {self.group_id}")

    @property
    def held(self) -> int:
        return len(self.handout.holding)

    def wake(self) -> None:
        self.handout.wake()

    # handing out

    def take(self, now: float) -> tuple[_KafkaReceived | None, float | None]:
        """The next record this member may hand out, or when to look again."""
        if self.handout.room <= 0:
            return None, None
        soonest: float | None = None
        unmarked = False
        for tp, entry, when in self.handout.candidates(now):
            if entry is not None and entry.marked <= entry.attempts:
                unmarked = True  # this delivery is counted first (`_write_marks`)
            elif entry is not None:
                entry.attempts += 1
                entry.holder = _KafkaReceived(self, self.partitions[tp], self.handout.take(entry))
                self.ahead -= 1
                if self.ahead <= self.handout.prefetch // 2 and self.unmarked:
                    self._mark(now)  # the next counts are written while these are handled
                return entry.holder, None
            elif when is not None:
                soonest = when if soonest is None else min(soonest, when)
        if unmarked:
            self._mark(now)  # wakes the member once written
            return None, None
        return None, soonest

    def _mark(self, now: float) -> None:
        if self.marking is None and not self.left:
            self.marking = asyncio.create_task(self._write_marks(now))

    async def _write_marks(self, now: float) -> None:
        """Count the next deliveries ahead, in one write: waiting records (in the order `take`
        visits the partitions) are counted one delivery more in the attempts table before
        any of them is handed out, topping up to `prefetch` counted ahead, so a member that
        dies holding them does not lose the count. The write goes out when half of those
        are handed out, so handing out rarely waits for it. (A member that dies leaves up to
        `prefetch` records counted once more than they were delivered: the price of one
        write per `prefetch / 2` records instead of one per record.)"""
        try:
            plan: dict[Any, list[_Entry]] = {}
            lanes = self.handout.order(advance=False)
            order = [self.partitions[tp] for tp in lanes[1:] + lanes[:1] if tp in self.partitions]
            for part in order:  # first what `take` would hand out next: it waits for these
                entry, _ = next_in_key_order(part.entries, self.handout.holding, now)
                if entry is not None and entry.marked <= entry.attempts:
                    plan[part.tp] = [entry]
            budget = self.handout.prefetch - self.ahead - len(plan)
            for part in order:  # then the records after those counted so far, in order
                chosen = plan.setdefault(part.tp, [])
                at = bisect.bisect_left(part.entries, part.mark_from, key=_offset_of)
                for entry in itertools.islice(part.entries, at, None):
                    if budget <= 0:
                        break
                    waiting = entry.holder is None and entry.marked <= entry.attempts
                    if waiting and entry not in chosen:
                        chosen.append(entry)
                        budget -= 1
            plan = {tp: entries for tp, entries in plan.items() if entries}
            if budget > 0:  # every waiting record is in the plan
                self.unmarked = False
            if not plan:
                return
            counts = {
                tp: self._counts(self.partitions[tp], entries) for tp, entries in plan.items()
            }
            await self.broker._hand_over_attempts(self.group_id, counts)
            for tp, entries in plan.items():
                for entry in entries:
                    entry.marked = max(entry.marked, entry.attempts + 1)
                owner = self.partitions.get(tp)
                if owner is not None:
                    owner.mark_from = max(owner.mark_from, max(e.offset for e in entries) + 1)
                self.ahead += len(entries)
        except KafkaBrokerError as exc:
            log.warning("kafka broker: %s cannot count deliveries: %s", self.group_id, exc)
            await asyncio.sleep(1.0)  # the table is unreachable: do not spin
        finally:
            self.marking = None
            self.wake()

    @staticmethod
    def _counts(part: _Partition, planned: list[_Entry]) -> str:
        """A partition's delivery counts once `planned` is counted ahead: the previous
        owner's, then this member's (all below `mark_from`, or planned now)."""
        end = max(part.mark_from, max(e.offset for e in planned) + 1)
        counts = {offset: n for offset, n in part.carried.items() if offset >= part.mark_from}
        for entry in part.entries:
            if entry.offset >= end:
                break
            counts[entry.offset] = max(entry.attempts, entry.marked)
        counts.update((e.offset, e.attempts + 1) for e in planned)
        return encode_attempts(counts)

    def finish(self, part: _Partition, entry: _Entry) -> int | None:
        """An entry was acked: forget it; the new commit point if it moved."""
        self._release(entry)
        part.entries.remove(entry)
        if part.paused and len(part.entries) < _BUFFER // 2 and self.consumer is not None:
            part.paused = False
            with contextlib.suppress(KafkaError):  # not assigned any more: nothing to resume
                self.consumer.resume(part.tp)
        return None if part.gone else part.offsets.settle(entry.offset)

    def retry(self, entry: _Entry, delay: float | None) -> None:
        """An entry was nacked: hand it out again after `delay`, still in key order."""
        self._release(entry)
        entry.not_before = time.monotonic() + (delay or 0.0)
        self.unmarked = True  # its next delivery is counted ahead too

    def _release(self, entry: _Entry) -> None:
        entry.holder = None
        self.handout.release(entry)
        self.settled.set()

    # fetching

    async def _pump(self) -> None:
        """Fetch records into the partitions' buffers until the member leaves."""
        backoff = 0.1
        while not self.left:
            try:
                batches = await self.consumer.getmany(timeout_ms=_POLL_MS, max_records=_BUFFER)
                epoch = self.epoch  # what getmany returns belongs to the current assignment
                fresh = [tp for tp in batches if tp not in self.partitions]
                carried = await self.broker._attempts_of(self.group_id, fresh) if fresh else {}
                if self.left or epoch != self.epoch:
                    continue  # revoked meanwhile: the next owner reads them from the commit
                moved: dict[Any, Any] = {}
                for tp, records in batches.items():
                    part = self.partitions.get(tp)
                    if part is None:
                        part = self.partitions[tp] = _Partition(tp, carried.get(tp, {}))
                    position = self._add(part, records)
                    if position is not None:
                        moved[tp] = OffsetAndMetadata(position, "")
                if batches:
                    self.wake()
                if moved:  # only other groups' replays: move past them
                    await self.commit(moved)
                backoff = 0.1
            except ConsumerStoppedError:
                return
            except (*_DOWN, BrokerError) as exc:
                if self.left:
                    return
                log.warning("kafka broker: %s fetching failed (%s); retrying", self.group_id, exc)
            except Exception:  # a bug must not stall the member silently
                log.exception("kafka broker: %s fetching failed; retrying", self.group_id)
            else:
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _add(self, part: _Partition, records: Sequence[Any]) -> int | None:
        """Buffer fetched records; other groups' replays are settled at once."""
        self.handout.lanes[part.tp] = part.entries  # the partition's lane in the hand-out
        position = None
        for record in records:
            last = part.offsets.last
            if last is not None and record.offset <= last:
                continue  # fetched twice: already here
            part.offsets.read(record.offset)
            headers = list(record.headers or ())
            target = next((v for n, v in headers if n == _REPLAY_HEADER), None)
            if target is not None and (target or b"").decode("utf-8", "replace") != self.group:
                position = part.offsets.settle(record.offset) or position
                continue
            try:
                message = from_record(self.topic, record.key, record.value, headers)
            except Exception as exc:  # never drop a record: the consumer dead-letters it
                log.warning("kafka broker: undecodable record at %s: %s", record.offset, exc)
                message = Message(self.topic, {}, record.value or b"")
            carried = part.carried.get(record.offset, 0)
            part.entries.append(_Entry(record.offset, message, carried, carried))
            self.unmarked = True
        if not part.paused and len(part.entries) >= _BUFFER:
            part.paused = True
            with contextlib.suppress(KafkaError):
                self.consumer.pause(part.tp)
        return position

    # committing

    async def commit(self, offsets: Mapping[Any, Any]) -> None:
        """Commit positions (with metadata); commits waiting for one another go as one."""
        self.to_commit.update(offsets)
        async with self.commit_lock:
            batch, self.to_commit = self.to_commit, {}
            if self.consumer is None:
                return
            assigned = self.consumer.assignment()  # a commit for another partition fails all
            batch = {tp: offset for tp, offset in batch.items() if tp in assigned}
            if not batch:
                return
            try:
                async with asyncio.timeout(self.broker.request_timeout):
                    await self.consumer.commit(batch)
            except (CommitFailedError, IllegalStateError) as exc:
                # The partitions moved on: their next owner delivers these records again.
                log.info("kafka broker: %s could not commit: %s", self.group_id, exc)
                return
            except _DOWN as exc:
                for tp, offset in batch.items():
                    self.to_commit.setdefault(tp, offset)  # again with the next commit
                raise _error(f"cannot commit for {self.group!r} on {self.topic!r}", exc) from exc
            for tp, offset in batch.items():
                self.committed[tp] = offset.offset

    async def hand_over(self, parts: list[_Partition]) -> None:
        """Give partitions up: commit their commit points, with the delivery counts of what
        was handed out and not finished, for the next owner."""
        offsets: dict[Any, Any] = {}
        counts: dict[Any, str] = {}
        if self.marking is not None:  # its counts go first; the exact ones below win
            await asyncio.gather(self.marking, return_exceptions=True)
        for part in parts:
            part.gone = True
            for entry in part.entries:
                if entry.holder is not None:
                    entry.holder.settled = True  # a late ack or nack changes nothing
                    self._release(entry)
            counts[part.tp] = encode_attempts({e.offset: e.attempts for e in part.entries})
            position = part.offsets.position
            if position is not None and position != self.committed.get(part.tp):
                offsets[part.tp] = OffsetAndMetadata(position, "")
        try:
            await self.broker._hand_over_attempts(self.group_id, counts)
            if offsets:
                await self.commit(offsets)
        except KafkaBrokerError as exc:
            log.warning("kafka broker: %s could not hand over: %s", self.group_id, exc)

    async def revoke(self) -> None:
        """A rebalance takes the partitions: let held records finish a while, then hand over."""
        self.epoch += 1
        parts = list(self.partitions.values())
        self.partitions = {}
        self.handout.lanes.clear()
        self.ahead = 0  # what was counted ahead goes with the partitions
        self.wake()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.broker.session_timeout / 2):
                while not self.left and any(e.holder for p in parts for e in p.entries):
                    self.settled.clear()
                    await self.settled.wait()
        await self.hand_over(parts)
        self.committed = {}

    async def leave(self) -> None:
        """Stop fetching, give everything unfinished back to the group, leave it."""
        self.left = True
        self.wake()
        self.settled.set()
        if self.pump is not None:
            self.pump.cancel()
            await asyncio.gather(self.pump, return_exceptions=True)
        try:
            parts = list(self.partitions.values())
            self.partitions = {}
            self.handout.lanes.clear()
            if parts and self.consumer is not None:
                await self.hand_over(parts)
        finally:
            await self.stop_client()

    async def stop_client(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            try:
                async with asyncio.timeout(self.broker.request_timeout):
                    await _leave_generation_zero(consumer)
                    await consumer.stop()
            except _DOWN as exc:
                log.warning("kafka broker: %s did not leave cleanly: %s", self.group_id, exc)


class _KafkaReceived(Received):
    def __init__(self, member: _Consumer, part: _Partition, entry: _Entry) -> None:
        super().__init__(entry.message, entry.attempts)
        self.member, self.part, self.entry = member, part, entry
        self.settled = False

    async def ack(self) -> None:
        if self.settled:
            return  # handed over already: the next owner has it
        self.settled = True
        position = self.member.finish(self.part, self.entry)
        if position is not None:
            await self.member.commit({self.part.tp: OffsetAndMetadata(position, "")})

    async def nack(self, delay: float | None) -> None:
        if not self.settled:
            self.settled = True
            self.member.retry(self.entry, delay)


def _offset_of(entry: _Entry) -> int:
    return entry.offset
