"""`NATSBroker`: the broker on NATS JetStream (`nats://host:4222`), on nats-py.

Every topic lives in one shared stream, `TIDINGS`, with limits retention: messages are kept
for `max_age` (7 days) whether or not every group has acked them, as a Kafka topic keeps its
log. `?retention=interest` keeps a message only until each group declared when it arrived
has acked it, so finished topics leave nothing behind; but nats-server 2.9 can drop a
message it has just acknowledged when the server is shut down at that moment (the consumers
stop before the stream, so the message finds no interest), which breaks "publish returns once
the broker has it durably". Limits retention has no such window. The retention of an existing
stream cannot change: opening with the other one is a `ConfigurationError` naming the stream.

Subjects are `tidings.<topic>.<lane>.<target>`: a keyed message goes to lane
`crc32(key) % shards` (16 by default), a keyless one to lane `any`; the target is `_` (every
group) or, for a replayed dead letter, the one group meant to retry it. Dots in names become
`~`, so a topic or group is always one token. Messages are published with `Nats-Msg-Id` set
to `<topic>:<event id>` (a retried publish is dropped as a duplicate within two minutes) and
each waits for its publish ack; a few retries cover a reconnect, then `BrokerError`.

A group is one durable pull consumer per lane, filtering `tidings.<topic>.<lane>.*` with
deliver policy "new" (the group gets what is published after `declare`). A keyed lane's
consumer has `max_ack_pending=1`: the server hands the lane's next message to any member only
once the previous one is acked, so one key is never in two hands and keeps publish order (keys
sharing a lane wait for each other, which bounds a group's parallelism by `shards`). The `any`
lane allows `max_in_flight` unacked messages. A nack is a `NAK` with the delay, held as the
lane's pending message; `attempt` is JetStream's delivery count; a dead-lettered message is
`TERM`ed (JetStream never redelivers it). A replay meant for one group
arrives at every group's consumer of the lane; the other groups ack and skip it.

A member pulls lazily: only while it waits for its next message does it send pull requests
(batch 1 and a five-second expiry per keyed lane; the free prefetch in one batch, open 0.2 s,
for `any`, so a busy member does not pay a round trip per keyless message) to its own inboxes,
so an idle or stopping member does not take messages it will not process. Leaving drains the
keyed lanes' inbox (the server drops pull requests nobody listens to, and what was in flight
arrives), lets the keyless batch request end (a NAK while it is open is miscounted by
nats-server 2.9), then NAKs what the member held, for another member to take at once. A
message fetched in a batch but given back without being handed out is remembered by stream
sequence, so its next `attempt` does not count that delivery (within this process). While it holds
messages it sends "in progress" every `ack_wait / 3`, so only a crashed member's messages wait
for `ack_wait` (30 s) before redelivery. nats-py reconnects by itself; the consumers keep their
state on the server, and pull requests lost in a reconnect expire and are sent again. A durable
consumer nobody pulls from for `group_expiry` (7 days) is deleted by the server with what it
still held, so test runs with random topics do not pile up consumers (their messages already
went when acked). Dead letters are JSON records in the stream `TIDINGS_DLQ` (subject
`tidings_dlq.<topic>.<id>`, kept unless `dead_letter_max_age` is set); listing one topic reads
only its subject, and dropping one purges its subject. A record must fit the server's
`max_payload` (1 MiB by default), which a message just under it can outgrow as JSON: such a
dead letter keeps the message cut to fit (data, then error, attribute and header values
shortened) and its error says so, rather than failing its consumer over and over. Publishing
an event over `max_payload`, or with headers over 64 KiB, is a `BrokerError` saying which.

Needs nats-server 2.9 or later with JetStream enabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from tidings.brokers.base import BrokerBase, DeadLetter, DeadLetterNotFound, Received
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError, InvalidCloudEvent
from tidings.store.base import url_options

__all__ = ["NATSBroker"]

log = logging.getLogger("tidings.brokers.nats")

_ANY = "any"  # the lane of keyless messages
_BATCH_EXPIRES = 0.2  # seconds a batch request on the keyless lane stays open at the server
_UNTAKEN_KEPT = 100_000  # given-back messages remembered for their attempt count
_ALL = "_"  # the target of a message for every group (no group name starts with "_")
_KEY_HEADER = "Tidings-Key"
_STRUCTURED = "application/cloudevents+json"
_API = "$JS.API"
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DEAD_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_STREAM_IN_USE = 10058  # JetStream: stream name already in use with another configuration
_RETENTIONS = {"limits": api.RetentionPolicy.LIMITS, "interest": api.RetentionPolicy.INTEREST}
_MAX_OUTSTANDING_PINGS = 2  # unanswered pings before nats-py drops the link as stale
_GRACE = 1.0  # seconds after a pull request's expiry before it counts as lost
_OPTIONS: dict[str, type] = {
    "shards": int,
    "ack_wait": float,
    "group_expiry": float,
    "stream": str,
    "prefix": str,
    "retention": str,
    "max_age": float,
    "dead_letter_max_age": float,
    "max_in_flight": int,
    "pull_expires": float,
    "publish_timeout": float,
    "publish_attempts": int,
    "connect_timeout": float,
    "ping_interval": float,
}
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


class NATSBroker(BrokerBase):
    """A broker on NATS JetStream; see the module docstring for the design.

    Options (keyword or URL query): `shards` lanes for keyed messages (16; keep it fixed
    while messages are in flight), `ack_wait` seconds before a crashed member's messages are
    redelivered (30), `group_expiry` seconds a group's consumers survive without members (7
    days; 0 keeps them), `stream` name (`TIDINGS`, dead letters in `<stream>_DLQ`), subject
    `prefix` (`tidings`), `retention` (`limits` or `interest`), `max_age` of messages (7 days;
    0 keeps them), `dead_letter_max_age`
    (0 keeps them), `max_in_flight` unacked keyless messages per group (1000),
    `pull_expires` (5 s), `publish_timeout` (5 s), `publish_attempts` (4), `connect_timeout`
    (5 s), `ping_interval` (10 s: a link that stalls without a reset is dropped and
    reconnected after two unanswered pings). Several servers: `nats://a:4222,b:4222`.
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        codec: JSONCodec | None = None,
        source: str = "tidings",
        shards: int = 16,
        ack_wait: float = 30.0,
        group_expiry: float = 7 * 86400.0,
        stream: str = "TIDINGS",
        prefix: str = "tidings",
        retention: str = "limits",
        max_age: float = 7 * 86400.0,
        dead_letter_max_age: float = 0.0,
        max_in_flight: int = 1000,
        pull_expires: float = 5.0,
        publish_timeout: float = 5.0,
        publish_attempts: int = 4,
        connect_timeout: float = 5.0,
        ping_interval: float = 10.0,
    ) -> None:
        super().__init__(codec=codec, source=source)
        if not 1 <= shards <= 1024:
            raise ConfigurationError(f"shards must be 1-1024, got {shards}")
        if not _PREFIX.match(stream) or not _PREFIX.match(prefix):
            raise ConfigurationError(
                f"stream {stream!r} and prefix {prefix!r}: use 1-64 letters, digits, '_' or '-'"
            )
        for name, value in (
            ("ack_wait", ack_wait),
            ("pull_expires", pull_expires),
            ("publish_timeout", publish_timeout),
            ("connect_timeout", connect_timeout),
            ("ping_interval", ping_interval),
        ):
            if value <= 0:
                raise ConfigurationError(f"{name} must be positive, got {value}")
        if retention not in _RETENTIONS:
            raise ConfigurationError(f"retention is 'limits' or 'interest', got {retention!r}")
        if min(group_expiry, max_age, dead_letter_max_age) < 0:
            raise ConfigurationError("group_expiry, max_age, dead_letter_max_age must be >= 0")
        if max_in_flight < 1 or publish_attempts < 1:
            raise ConfigurationError("max_in_flight and publish_attempts must be at least 1")
        self.url = url.split("?", 1)[0]
        self.servers = _servers(self.url)
        self.address = ",".join(_address(server) for server in self.servers)
        self.shards = shards
        self.ack_wait = ack_wait
        self.group_expiry = group_expiry
        self.stream = stream
        self.dead_letter_stream = f"{stream}_DLQ"
        self.prefix = prefix
        self.retention = retention
        self.max_age = max_age
        self.dead_letter_max_age = dead_letter_max_age
        self.max_in_flight = max_in_flight
        self.pull_expires = pull_expires
        self.publish_timeout = publish_timeout
        self.publish_attempts = publish_attempts
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self._lanes = [str(shard) for shard in range(shards)] + [_ANY]
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._pullers: dict[str, _Puller] = {}
        # Stream sequence -> how often a member of this process fetched the message in a batch
        # and gave it back without handing it out: JetStream counts those deliveries, `attempt`
        # does not. Another process cannot know, so there a returned message may say one more.
        self._untaken: dict[int, int] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NATSBroker:
        if urlsplit(url).scheme.lower() != "nats":
            raise ConfigurationError(f"a NATS broker URL starts with 'nats://', got {url!r}")
        return cls(url, **(url_options(url, _OPTIONS) | options))

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                self._nc = await nats.connect(
                    self.servers,
                    name="tidings",
                    connect_timeout=max(1, round(self.connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    ping_interval=self.ping_interval,
                    max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except _NATS_ERRORS as exc:
            raise BrokerError(
                f"cannot connect to NATS at {self.address}: {_describe(exc)}"
            ) from exc
        self._js = self._nc.jetstream(timeout=self.publish_timeout)
        try:
            await self._ensure_streams()
        except BaseException:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()
            raise

    async def _close(self) -> None:
        for name in list(self._pullers):
            await self._leave_puller(name)
        if self._nc is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS at %s: %s", self.address, _describe(exc))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("NATS connection to %s lost; reconnecting", self.address)

    async def _on_reconnected(self) -> None:
        log.info("NATS connection to %s is back", self.address)
        for puller in self._pullers.values():
            puller.waiting.clear()  # pull requests may be gone with the old connection
            puller.wake.set()

    def _connection(self) -> tuple[Client, JetStreamContext]:
        if self._nc is None or self._js is None:
            raise BrokerError("the NATS broker is not connected")
        return self._nc, self._js

    async def _ensure_streams(self) -> None:
        await self._ensure_stream(
            api.StreamConfig(
                name=self.stream,
                description="tidings topics (see tidings.brokers.nats)",
                subjects=[f"{self.prefix}.>"],
                retention=_RETENTIONS[self.retention],
                storage=api.StorageType.FILE,
                max_age=self.max_age,
                duplicate_window=min(120.0, self.max_age or 120.0),  # no longer than max_age
            )
        )
        await self._ensure_stream(
            api.StreamConfig(
                name=self.dead_letter_stream,
                description="tidings dead letters (see tidings.brokers.nats)",
                subjects=[f"{self.prefix}_dlq.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=self.dead_letter_max_age,
            )
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        _, js = self._connection()
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_IN_USE:
                raise BrokerError(f"cannot create stream {config.name}: {exc}") from exc
            existing = (await js.stream_info(str(config.name))).config
            if existing.retention != config.retention:
                raise ConfigurationError(
                    f"stream {config.name} on NATS at {self.address} has "
                    f"{_retention_name(existing.retention)} retention, not "
                    f"{_retention_name(config.retention)}: open it with that retention, "
                    "or delete the stream (and what it holds) first"
                ) from exc
            log.debug("stream %s exists with another configuration; using it", config.name)
        except _NATS_ERRORS as exc:
            raise BrokerError(
                f"cannot create stream {config.name} on NATS at {self.address} "
                f"(is JetStream enabled?): {_describe(exc)}"
            ) from exc

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        sends = []
        for message in messages:
            headers, body = _wire(message, self.header_prefix)
            if message.id:
                headers["Nats-Msg-Id"] = f"{topic}:{message.id}"
            sends.append((self._subject(topic, self._lane(message.key), _ALL), body, headers))
        if len(sends) == 1:
            await self._send(*sends[0])
        else:
            await self._send_many(sends)

    async def _send_many(self, sends: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """Publish a batch without waiting for each ack (JetStream's async publish: the
        server stores one connection's messages in order), then collect the acks. From the
        first message not acked in time on, the rest go one by one through `_send`, with its
        retries; what was stored meanwhile is dropped as a duplicate by its `Nats-Msg-Id`."""
        _, js = self._connection()
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self.publish_timeout):
                for subject, body, headers in sends:
                    futures.append(
                        await js.publish_async(
                            subject,
                            body,
                            stream=self.stream if subject.startswith(f"{self.prefix}.") else None,
                            headers=headers,
                        )
                    )
                await asyncio.gather(*futures, return_exceptions=True)
        except (TimeoutError, *_NATS_ERRORS) as exc:
            log.warning("a batch to NATS was not acked in full (%s); resending", _describe(exc))
        finally:
            for future in futures:
                future.cancel()  # one never answered: free its slot in nats-py's window
        for index, future in enumerate(futures):
            failure = None if future.cancelled() else future.exception()
            if isinstance(failure, nats.js.errors.APIError):
                raise BrokerError(f"NATS refused the message on {sends[index][0]}: {failure}")
            if future.cancelled() or failure is not None:
                for subject, body, headers in sends[index:]:
                    await self._send(subject, body, headers)
                return
        for subject, body, headers in sends[len(futures) :]:  # never sent: a send failed
            await self._send(subject, body, headers)

    async def _send(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish and wait for the stream's ack; retried (same message id) a few times."""
        _, js = self._connection()
        delay = 0.05
        for attempt in range(1, self.publish_attempts + 1):
            try:
                await js.publish(
                    subject,
                    body,
                    timeout=self.publish_timeout,
                    stream=self.stream if subject.startswith(f"{self.prefix}.") else None,
                    headers=dict(headers),
                )
                return
            except nats.js.errors.APIError as exc:
                raise BrokerError(f"NATS refused the message on {subject}: {exc}") from exc
            except (nats.errors.ConnectionClosedError, nats.errors.MaxPayloadError) as exc:
                raise BrokerError(f"cannot publish to {subject}: {_describe(exc)}") from exc
            except _NATS_ERRORS as exc:
                if attempt == self.publish_attempts:
                    raise BrokerError(
                        f"NATS at {self.address} did not take the message on {subject} "
                        f"after {attempt} attempts: {_describe(exc)}"
                    ) from exc
                log.warning("publishing to %s failed (%s); retrying", subject, _describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 4, 1.0)
                if isinstance(exc, nats.js.errors.NoStreamResponseError):
                    with contextlib.suppress(BrokerError):
                        await self._ensure_streams()  # deleted under us, or JetStream restarting

    def _lane(self, key: str | None) -> str:
        return _ANY if key is None else str(zlib.crc32(key.encode()) % self.shards)

    def _subject(self, topic: str, lane: str, target: str) -> str:
        return f"{self.prefix}.{_token(topic)}.{lane}.{target}"

    # -- groups and members ----------------------------------------------------------------

    def _count_untaken(self, sequence: int) -> None:
        if len(self._untaken) >= _UNTAKEN_KEPT:
            del self._untaken[next(iter(self._untaken))]  # the oldest
        self._untaken[sequence] = self._untaken.get(sequence, 0) + 1

    def _durable(self, topic: str, group: str, lane: str) -> str:
        return f"{_group_name(topic, group)}-{lane}"

    async def _declare(self, topic: str, group: str) -> None:
        await asyncio.gather(*(self._ensure_consumer(topic, group, lane) for lane in self._lanes))

    async def _ensure_consumer(self, topic: str, group: str, lane: str) -> None:
        _, js = self._connection()
        name = self._durable(topic, group, lane)
        config = api.ConsumerConfig(
            durable_name=name,
            description=f"tidings group {group} on topic {topic}, lane {lane}",
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            filter_subject=self._subject(topic, lane, "*"),
            max_ack_pending=self.max_in_flight if lane == _ANY else 1,
            inactive_threshold=self.group_expiry or None,
        )
        try:
            await js.add_consumer(self.stream, config)
        except nats.js.errors.BadRequestError as exc:
            # It exists with another configuration (other options): keep it as it is.
            try:
                await js.consumer_info(self.stream, name)
            except _NATS_ERRORS:
                raise BrokerError(f"cannot create consumer {name}: {exc}") from exc
            log.debug("consumer %s exists with another configuration; using it", name)
        except _NATS_ERRORS as exc:
            raise BrokerError(
                f"cannot declare group {group!r} on {topic!r}: {_describe(exc)}"
            ) from exc

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        puller = _Puller(self, topic, group, max(1, prefetch))
        self._pullers[member] = puller
        await puller.start()
        while not (self._closed or puller.leaving):
            puller.wake.clear()
            if puller.buffer:
                received = puller.take()
                if received is not None:
                    yield received
                continue
            await puller.pull()
            if not puller.wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(puller.patience()):
                        await puller.wake.wait()

    async def _leave(self, topic: str, group: str, member: str) -> None:
        await self._leave_puller(member)

    async def _leave_puller(self, member: str) -> None:
        puller = self._pullers.pop(member, None)
        if puller is not None:
            await puller.leave()

    def _decode(self, topic: str, msg: Msg) -> Message:
        headers = dict(msg.headers or {})
        raw_key = headers.get(_KEY_HEADER)
        key = None if raw_key is None else unquote(raw_key)
        prefix = self.header_prefix
        try:
            return Message.from_binary(topic, headers, msg.data, prefix=prefix, key=key)
        except InvalidCloudEvent:  # no CloudEvent at all: let the consumer dead-letter it
            attributes = {
                name[len(prefix) :].lower(): value
                for name, value in headers.items()
                if name.lower().startswith(prefix)
            }
            return Message(topic, attributes, msg.data, key, headers)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        await self._declare(dead.topic, dead.group)
        message = dead.message
        headers, body = _wire(message, self.header_prefix)
        headers["Nats-Msg-Id"] = f"replay:{dead.id}"
        lane = self._lane(message.key)
        await self._send(self._subject(dead.topic, lane, _token(dead.group)), body, headers)

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        nc, _ = self._connection()
        body = dead.to_json(nc.max_payload, limit_name="NATS' max_payload")
        await self._send(self._dead_subject(dead.topic, dead.id), body, {"Nats-Msg-Id": dead.id})

    async def _dead_letters(self) -> list[DeadLetter]:
        return await self._read_dead_letters(f"{self.prefix}_dlq.>")

    async def dead_letters(self, topic: str | None = None) -> list[DeadLetter]:
        """Every dead letter (of one topic), oldest first; one topic reads only its own."""
        self._check_open()
        if topic is None:
            return await self._dead_letters()
        return await self._read_dead_letters(f"{self.prefix}_dlq.{_token(topic)}.*")

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; `LookupError` naming it when there is none."""
        self._check_open()
        if isinstance(dead_letter_id, str) and _DEAD_ID.match(dead_letter_id):
            found = await self._read_dead_letters(f"{self.prefix}_dlq.*.{dead_letter_id}", 1)
            if found:
                return found[0]
        raise DeadLetterNotFound(dead_letter_id)

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        _, js = self._connection()
        if not _DEAD_ID.match(dead_letter_id):
            return
        try:
            await js.purge_stream(
                self.dead_letter_stream, subject=f"{self.prefix}_dlq.*.{dead_letter_id}"
            )
        except _NATS_ERRORS as exc:
            raise BrokerError(f"cannot drop dead letter {dead_letter_id}: {exc}") from exc

    async def _read_dead_letters(self, subject: str, limit: int = 0) -> list[DeadLetter]:
        _, js = self._connection()
        found: list[DeadLetter] = []
        seq = 1
        while not limit or len(found) < limit:
            try:
                raw = await js.get_msg(self.dead_letter_stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            except _NATS_ERRORS as exc:
                raise BrokerError(f"cannot read the dead letters: {_describe(exc)}") from exc
            if raw.seq is None:
                break
            seq = raw.seq + 1
            try:
                found.append(DeadLetter.from_dict(json.loads(raw.data or b"{}")))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable dead letter #%s: %s", raw.seq, exc)
        return found

    def _dead_subject(self, topic: str, dead_letter_id: str) -> str:
        return f"{self.prefix}_dlq.{_token(topic)}.{dead_letter_id}"


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
        self.puller = puller
        self.msg = msg
        self.message = message
        self.sequence = sequence  # in the stream
        self.attempt = attempt
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


# -- helpers ------------------------------------------------------------------------------


def _ack_numbers(msg: Msg) -> tuple[int, int]:
    """(stream sequence, deliveries so far) from a JetStream message's reply subject.

    Read straight from its tokens: nats-py's `msg.metadata` builds a datetime and two
    objects per message, a tenth of a consumer's time."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:  # with <domain>.<account hash> after ACK
            return int(tokens[7]), int(tokens[6])
    metadata = msg.metadata  # anything else: let nats-py parse (or reject) it
    return metadata.sequence.stream, metadata.num_delivered


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


def _token(name: str) -> str:
    """A topic or group name as one subject token (names never contain `~`)."""
    return name.replace(".", "~")


def _servers(url: str) -> list[str]:
    rest = url.split("://", 1)[1] if "://" in url else url
    servers = [f"nats://{part}" for part in rest.strip("/").split(",") if part]
    return servers or ["nats://127.0.0.1:4222"]


def _address(server: str) -> str:
    parts = urlsplit(server)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 4222}"


@functools.lru_cache(maxsize=4096)
def _group_name(topic: str, group: str) -> str:
    """The durable consumers' name stem for `group` of `topic` (readable, then unique)."""
    digest = hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", group)[:40]
    return f"{readable}-{digest}"


def _retention_name(policy: api.RetentionPolicy | None) -> str:
    return next((name for name, p in _RETENTIONS.items() if p == policy), str(policy))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@functools.cache
def _header_name_safe(name: str) -> bool:
    return bool(_HEADER_NAME.match(name))  # a handful of distinct names: checked once each


def _header_safe(name: str, value: str) -> bool:
    return (
        _header_name_safe(name)
        and value == value.strip()
        and "\r" not in value
        and "\n" not in value
    )


def _wire(message: Message, prefix: str) -> tuple[dict[str, str], bytes]:
    """Headers and body: binary mode, or structured when an attribute cannot be a header."""
    headers = message.binary_headers(prefix)
    body = message.data
    if not all(_header_safe(name, value) for name, value in headers.items()):
        headers, body = {"content-type": _STRUCTURED}, message.structured()
    if message.key is not None and "partitionkey" not in message.attributes:
        headers[_KEY_HEADER] = quote(message.key, safe="")  # ce-partitionkey carries it else
    return headers, body


async def _quietly(action: Awaitable[None]) -> None:
    with contextlib.suppress(*_NATS_ERRORS):
        await action
