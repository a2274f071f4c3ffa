"""One member of a group: its pull requests (only while it waits), the messages they bring,
handing them out, keeping them alive, settling them (ack, NAK, TERM) and giving them back
when it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.nats.errors import _NATS_ERRORS, _describe, _quietly
from tidings.brokers.nats.records import _ack_numbers
from tidings.brokers.nats.topology import _ALL, _ANY, _group_name, _token
from tidings.core.errors import BrokerError

if TYPE_CHECKING:
    from tidings.brokers.nats.broker import NATSBroker

log = logging.getLogger("tidings.brokers.nats")

_BATCH_EXPIRES = 0.2  # seconds a batch request on the keyless lane stays open at the server
_API = "$JS.API"
_GRACE = 1.0  # seconds after a pull request's expiry before it counts as lost


class _Puller:
    """One member's pull requests, the messages they brought and the messages it holds."""

    def __init__(self, broker: NATSBroker, topic: str, group: str, prefetch: int) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.prefetch = prefetch
        self.target = _token(group)
        self.nc, _ = broker._connection()
        self.inbox = self.nc.new_inbox()  # replies to the keyed lanes' requests
        self.any_inbox = self.nc.new_inbox()  # and to the keyless lane's (leaving drains it last)
        self.sub: Subscription | None = None
        self.any_sub: Subscription | None = None
        self.buffer: deque[Msg] = deque()
        self._requests: dict[tuple[int, float], bytes] = {}  # encoded, by (batch, expiry)
        self.outstanding: dict[str, int] = {}  # lane -> messages its request may still bring
        self.waiting: dict[str, deque[float]] = {}  # lane -> deadlines of pull requests
        self.held: dict[int, _NATSReceived] = {}
        self.wake = asyncio.Event()
        self.leaving = False
        self.redeclare = False
        self.keepalive: asyncio.Task[None] | None = None
        self.chores: set[asyncio.Future[None]] = set()  # acks of other groups' replays

    async def start(self) -> None:
        try:
            self.sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._arrived)
            self.any_sub = await self.nc.subscribe(f"{self.any_inbox}.*", cb=self._arrived)
        except _NATS_ERRORS as exc:
            raise BrokerError(f"cannot subscribe to NATS: {_describe(exc)}") from exc
        self.keepalive = asyncio.create_task(self._keep_alive())

    async def _arrived(self, msg: Msg) -> None:
        if not msg.reply:  # a status about one of our pull requests
            headers = msg.headers or {}
            status = headers.get("Status", "")
            if status == "100":  # idle heartbeat
                return
            self._answered(msg.subject.rpartition(".")[2], finished=True)
            description = str(headers.get(api.Header.DESCRIPTION, ""))
            if status == "503" or "Deleted" in description:
                self.redeclare = True  # the consumer is gone (expired or deleted)
            self.wake.set()
            return
        self._answered(msg.subject.rsplit(".", 2)[-2])  # its subject: ...<lane>.<target>
        self.buffer.append(msg)
        self.wake.set()

    def _answered(self, lane: str, *, finished: bool = False) -> None:
        """A message (or, `finished`, the server's end of the request) came for `lane`."""
        left = self.outstanding.get(lane, 0) - 1
        self.outstanding[lane] = left
        if finished or left <= 0:
            self.outstanding[lane] = 0
            deadlines = self.waiting.get(lane)
            if deadlines:
                deadlines.popleft()

    def take(self) -> _NATSReceived | None:
        """The next buffered message as a delivery; None for another group's replay."""
        msg = self.buffer.popleft()
        if msg.subject.rpartition(".")[2] not in (_ALL, self.target):
            task = asyncio.ensure_future(_quietly(msg.ack()))
            self.chores.add(task)
            task.add_done_callback(self.chores.discard)
            return None
        message = self.broker._decode(self.topic, msg)
        sequence, delivered = _ack_numbers(msg)
        untaken = self.broker._untaken.get(sequence, 0)
        received = _NATSReceived(self, msg, message, sequence, max(1, delivered - untaken))
        self.held[id(received)] = received
        return received

    async def pull(self) -> None:
        """Ask every lane without an outstanding request for messages (only while waiting)."""
        broker = self.broker
        if self.redeclare:
            self.redeclare = False
            try:
                await broker._declare(self.topic, self.group)
            except BrokerError as exc:
                log.warning("re-declaring %s/%s failed: %s", self.topic, self.group, exc)
                await asyncio.sleep(1.0)
        now = time.monotonic()
        for deadlines in self.waiting.values():
            while deadlines and deadlines[0] < now:
                deadlines.popleft()  # lost with a connection: ask again
        room = self.prefetch - len(self.held) - len(self.buffer)
        if room <= 0:
            return
        expires = broker.pull_expires
        stem = f"{_API}.CONSUMER.MSG.NEXT.{broker.stream}.{_group_name(self.topic, self.group)}"
        for lane in broker._lanes:
            deadlines = self.waiting.setdefault(lane, deque())
            # One request at a time per lane. A keyed lane has one message in flight anyway;
            # the keyless lane asks for the free prefetch in one batch, so a busy member does
            # not pay a round trip per message.
            if deadlines:
                continue
            batch, lasts = (room, min(expires, _BATCH_EXPIRES)) if lane == _ANY else (1, expires)
            request = self._requests.get((batch, lasts))
            if request is None:
                request = json.dumps({"batch": batch, "expires": int(lasts * 1e9)}).encode()
                self._requests[batch, lasts] = request
            deadlines.append(now + lasts + _GRACE)
            self.outstanding[lane] = batch
            try:
                inbox = self.any_inbox if lane == _ANY else self.inbox
                await self.nc.publish(f"{stem}-{lane}", request, reply=f"{inbox}.{lane}")
            except _NATS_ERRORS as exc:
                log.debug("pull request failed: %s", _describe(exc))
                return  # asked again once its deadline passes

    def patience(self) -> float:
        """Seconds to wait for a message before looking at the pull requests again."""
        now = time.monotonic()
        soonest = min((d[0] for d in self.waiting.values() if d), default=now + 1.0)
        return max(0.05, soonest - now)

    async def _keep_alive(self) -> None:
        """Tell JetStream that held and buffered messages are being worked on."""
        interval = max(0.5, self.broker.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in [*self.buffer, *(r.msg for r in self.held.values())]:
                with contextlib.suppress(*_NATS_ERRORS):
                    await msg.in_progress()

    async def leave(self) -> None:
        self.leaving = True
        self.wake.set()
        if self.keepalive is not None:
            self.keepalive.cancel()
            await asyncio.gather(self.keepalive, return_exceptions=True)
        await _drain(self.sub)  # the keyed lanes' requests: what the server sent arrives first
        if self.any_sub is not None and self.waiting.get(_ANY):
            # A batch request still open at the server would take the keyless messages NAKed
            # below (and JetStream 2.9 then miscounts their deliveries): let it end first,
            # keeping what it brings. It lasts at most _BATCH_EXPIRES.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_BATCH_EXPIRES + _GRACE):
                    while self.waiting.get(_ANY):
                        self.wake.clear()
                        await self.wake.wait()
        await _drain(self.any_sub)
        for msg in self.buffer:  # fetched but never handed out: not an attempt
            self.broker._count_untaken(_ack_numbers(msg)[0])
        unsettled = [*self.buffer, *(r.msg for r in self.held.values())]
        for received in self.held.values():
            received.settled = True
        self.buffer.clear()
        self.held.clear()
        for msg in unsettled:  # back to the group now, not after ack_wait
            with contextlib.suppress(*_NATS_ERRORS):
                await msg.nak()


class _NATSReceived(Received):
    def __init__(
        self, puller: _Puller, msg: Msg, message: Message, sequence: int, attempt: int
    ) -> None:
        super().__init__(message, attempt)
        self.puller, self.msg = puller, msg
        self.sequence = sequence  # in the stream
        self.settled = False

    async def ack(self) -> None:
        self.puller.broker._untaken.pop(self.sequence, None)
        await self._settle(self.msg.ack)

    async def nack(self, delay: float | None) -> None:
        async def nak() -> None:
            await self.msg.nak(delay=delay if delay and delay > 0 else None)

        await self._settle(nak)

    async def terminate(self) -> None:
        self.puller.broker._untaken.pop(self.sequence, None)
        await self._settle(self.msg.term)  # AckTerm: JetStream stops redelivering it

    async def _settle(self, action: Callable[[], Awaitable[None]]) -> None:
        if self.settled:
            return  # its member left and gave it back already
        self.settled = True
        self.puller.held.pop(id(self), None)
        self.puller.wake.set()
        try:
            await action()
        except _NATS_ERRORS as exc:
            raise BrokerError(f"cannot settle message {self.message.id}: {_describe(exc)}") from exc


async def _drain(sub: Subscription | None) -> None:
    """Stop a pull-reply subscription; what the server already sent is delivered first."""
    if sub is None:
        return
    try:
        async with asyncio.timeout(5.0):
            await sub.drain()  # type: ignore[no-untyped-call]
    except _NATS_ERRORS:
        with contextlib.suppress(*_NATS_ERRORS):
            await sub.unsubscribe()
