"""One member of a group: receiving from its queue, handing out in key order within
`prefetch`, keeping what it holds invisible, settling (ack, nack) and leaving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import HandOut
from tidings.brokers.sqs.errors import _GONE, SQSBrokerError
from tidings.brokers.sqs.records import _BATCH, _KEY_ATTRIBUTE, _decode
from tidings.brokers.sqs.topology import _queue
from tidings.core.errors import BrokerError

if TYPE_CHECKING:
    from tidings.brokers.sqs.broker import SQSBroker


log = logging.getLogger("tidings.brokers.sqs")

_MAX_VISIBILITY = 43_200  # SQS: 12 hours
_UNTAKEN_KEPT = 100_000  # given-back messages remembered for their attempt count


@dataclass(eq=False)
class _Entry:
    """A received message a member holds, handed out (`holder`) or not yet."""

    message: Message
    message_id: str  # SQS's, the same on every receive
    receipt: str  # this receive's handle
    count: int  # ApproximateReceiveCount
    not_before: float = 0.0  # never set: a nacked message goes back to SQS


@dataclass(eq=False)
class _Member:
    topic: str
    group: str
    name: str
    queue_url: str
    prefetch: int
    handout: HandOut[int, _Entry] = field(init=False)  # one lane: the group's queue
    receiving: asyncio.Task[None] | None = None
    heartbeat: asyncio.Task[None] | None = None
    left: bool = False

    def __post_init__(self) -> None:
        self.handout = HandOut(self.prefetch)

    @property
    def entries(self) -> list[_Entry]:
        """What it received and has not settled or given back, in order of receipt."""
        return self.handout.lane(0)

    @property
    def room(self) -> int:
        """SQS hides what a member received: it holds at most `prefetch`, handed out or not."""
        return self.prefetch - len(self.entries)


class _SQSReceived(Received):
    def __init__(self, broker: SQSBroker, member: _Member, entry: _Entry, attempt: int) -> None:
        super().__init__(entry.message, attempt)
        self.broker, self.member, self.entry = broker, member, entry

    async def ack(self) -> None:
        if not self._release():
            return  # its member left and gave it back already
        self.broker._untaken.pop(self.entry.message_id, None)
        await self.broker._call(
            "sqs",
            "delete_message",
            f"ack {self.message.id}",
            QueueUrl=self.member.queue_url,
            ReceiptHandle=self.entry.receipt,
        )

    async def nack(self, delay: float | None) -> None:
        member, entry = self.member, self.entry
        if not self._release():
            return
        seconds = min(_MAX_VISIBILITY, math.ceil(delay)) if delay and delay > 0 else 0
        back = [entry]
        if entry.message.key is not None:  # what follows of its key must wait for it
            back += [
                e
                for e in member.entries
                if e.message.key == entry.message.key and not member.handout.held(e)
            ]
            for later in back[1:]:
                member.entries.remove(later)
                _count_untaken(self.broker, later.message_id)
        await _set_visibility(self.broker, member.queue_url, back, seconds)

    def _release(self) -> bool:
        member = self.member
        if self.entry not in member.entries:
            return False
        member.handout.finish(0, self.entry)
        return True


async def _receive(
    broker: SQSBroker, topic: str, group: str, member: str, prefetch: int
) -> AsyncIterator[Received]:
    m = _Member(topic, group, member, await _queue(broker, topic, group), max(1, prefetch))
    broker._members[member] = m
    broker._join(member, lambda: _leave_member(broker, member))
    m.heartbeat = asyncio.create_task(_keep_invisible(broker, m))
    while not (m.left or broker._closed):
        entry, _ = m.handout.next()
        if entry is not None:
            m.handout.take(entry)
            attempt = max(1, entry.count - broker._untaken.get(entry.message_id, 0))
            yield _SQSReceived(broker, m, entry, attempt)
            continue
        if m.receiving is None and m.room > 0:
            m.receiving = asyncio.create_task(_fetch(broker, m, min(_BATCH, m.room)))
        await m.handout.wait(None)  # a cancelled wait leaves the receive running


async def _fetch(broker: SQSBroker, m: _Member, count: int) -> None:
    """One receive into the member's entries; it survives the waiter's cancellation, so
    what SQS hands out always reaches the member (and goes back when it leaves)."""
    try:
        reply = await broker._call(
            "sqs",
            "receive_message",
            f"receive from {m.topic!r}/{m.group!r}",
            QueueUrl=m.queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=broker.wait_time,
            AttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=[_KEY_ATTRIBUTE],
        )
        for raw in reply.get("Messages", []):
            m.handout.add(
                0,
                _Entry(
                    _decode(m.topic, raw),
                    str(raw["MessageId"]),
                    str(raw["ReceiptHandle"]),
                    int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                ),
            )
        if not reply.get("Messages") and not broker.wait_time and not m.left:
            await asyncio.sleep(broker.poll_interval)
    except SQSBrokerError as exc:
        if not (m.left or broker._closed):
            log.warning("%s/%s: %s; retrying", m.topic, m.group, exc)
            if "NonExistentQueue" in str(exc):
                broker._queues.pop((m.topic, m.group), None)
                with contextlib.suppress(BrokerError):
                    m.queue_url = await _queue(broker, m.topic, m.group)
            await asyncio.sleep(1.0)
    finally:
        m.receiving = None
        m.handout.wake()


async def _keep_invisible(broker: SQSBroker, m: _Member) -> None:
    """Extend the visibility of what the member holds, so only a crash lets it go."""
    interval = max(0.5, broker.visibility_timeout / 3)
    while not m.left:
        await asyncio.sleep(interval)
        try:
            await _set_visibility(broker, m.queue_url, list(m.entries), broker.visibility_timeout)
        except BrokerError as exc:
            log.warning("%s/%s: cannot extend visibility: %s", m.topic, m.group, exc)


async def _set_visibility(
    broker: SQSBroker, queue_url: str, entries: list[_Entry], seconds: int
) -> None:
    for start in range(0, len(entries), _BATCH):
        batch = entries[start : start + _BATCH]
        reply = await broker._call(
            "sqs",
            "change_message_visibility_batch",
            "change message visibility",
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": e.receipt, "VisibilityTimeout": seconds}
                for i, e in enumerate(batch)
            ],
        )
        for failed in reply.get("Failed", []):
            if failed.get("Code") not in _GONE:  # deleted or redelivered meanwhile: fine
                log.warning("cannot change visibility: %s", failed.get("Message"))


def _count_untaken(broker: SQSBroker, message_id: str) -> None:
    if len(broker._untaken) >= _UNTAKEN_KEPT:
        del broker._untaken[next(iter(broker._untaken))]  # the oldest
    broker._untaken[message_id] = broker._untaken.get(message_id, 0) + 1


async def _leave_member(broker: SQSBroker, name: str) -> None:
    m = broker._members.pop(name, None)
    if m is None:
        return
    m.left = True
    m.handout.wake()
    if m.heartbeat is not None:
        m.heartbeat.cancel()
        await asyncio.gather(m.heartbeat, return_exceptions=True)
    if m.receiving is not None:  # what it brings goes back too
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(broker.wait_time + broker.connect_timeout + 5):
                await asyncio.shield(m.receiving)
    entries = m.handout.drop(0)
    for entry in entries:
        if not m.handout.held(entry):
            _count_untaken(broker, entry.message_id)
    if entries:  # visible again now, not after the visibility timeout
        await _set_visibility(broker, m.queue_url, entries, 0)
