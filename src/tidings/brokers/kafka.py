"""`KafkaBroker`: the broker on Apache Kafka (`kafka://host:9092[,host:9092]?partitions=8`),
on aiokafka.

A tidings topic is the Kafka topic of the same name, created on first use with `partitions`
partitions (8) and `replication` replicas (1; use 3 in production). A message is a Kafka
record in the CloudEvents Kafka binding's binary mode: the attributes as `ce_` headers plus
`content-type`, the data as the value, and the ordering key as the record key. The producer
is idempotent by default (`enable_idempotence=True`, so `acks=all`): a publish returns once
every in-sync replica has the record, and a retried send is not written twice. A cluster that
refuses producer ids (no IdempotentWrite ACL, some Kafka-protocol brokers such as Tansu) makes
opening fail with an error naming `?idempotence=false`; with it, the producer still waits for
`acks=all` but a retried send may be written twice (consumers de-duplicate by event id behind
the inbox). The record key picks the partition with Kafka's murmur2 (as the Java client does),
so one key always lands in one partition, in publish order. Keyless records go to a random
partition each (`keyless=spread`, the default), so the members of a group compete for them as
on every other broker, with no order between them (none is promised); `keyless=sticky` sends
one publisher's keyless records of a topic to one partition picked at random, in order, but
then to one member only. A publish that
Kafka does not acknowledge within `publish_timeout` raises `KafkaBrokerError` (the record may
still arrive later: at least once, never lost once acknowledged).

A group of a topic is the Kafka consumer group `<prefix>:<topic>:<group>` (one per topic, so
a rebalance on one topic leaves the others alone); each member is one `AIOKafkaConsumer` of
it, so members compete by owning partitions. `declare` commits the current end offset of every
partition for which the group has no committed offset (with a group-less commit, which Kafka
accepts while the group has no members), so the group gets everything published after it and
nothing before. A partition without a committed offset (one added later, or offsets expired
after Kafka's `offsets.retention.minutes` without members) is read from its beginning: a
duplicate rather than a loss.

A member keeps the records it fetched per partition in offset order and hands one out only
when no earlier record of the same key is held or waiting for a retry (`next_in_key_order`),
so one key keeps its order and is never in two hands, while other keys of the partition go in
parallel; at most `prefetch` are held at a time, and a partition with many records waiting is
paused. Offsets are committed only for processed records: an `OffsetTracker` per partition
keeps the offsets read, the acked ones, and the commit point after the longest acked prefix,
and every ack that moves it commits it (acks that arrive together share one commit). `nack(delay)`
keeps the record in the member and hands it out again after the delay; the commit point stays
behind it, so if the member goes away meanwhile the record comes back from Kafka.

On a rebalance (`ConsumerRebalanceListener.on_partitions_revoked`) the member stops handing
out, waits up to half the `session_timeout` for what it holds to be settled, and commits the
commit points; what is still unacked (held past that wait, nacked, fetched but not handed
out) is read again by the partition's next owner from there. Leaving does the same without
waiting. A crashed member's partitions go to the others after `session_timeout` (10 s), and
they read from the last commit. Records replayed for another group are passed over (acked
unseen).

`attempt`: Kafka counts no deliveries. The member counts them, and when it gives a partition
up (rebalance or leaving) it writes the counts of the records it handed out but did not finish
to the compacted topic `<prefix>.attempts`, keyed by group and partition
(`tidings-attempts:<offset>=<count>,...`), before it commits; the next owner reads them there,
so a message given back arrives with the next attempt. (Not in the commit's metadata: some
Kafka-protocol brokers, Tansu among them, drop it.) So that a crash loses no count either, the
member writes the counts ahead: before it hands a record out, that delivery is already in the
table, one write covering the next `prefetch` records and sent when half of them are out
(`_write_marks`), so handing out rarely waits for it. A member that dies thus leaves up to
`prefetch` records counted one delivery higher than they were delivered, never lower.

Dead letters are `DeadLetter.to_dict` JSON records in the compacted topic
`<prefix>.dead-letters` (one partition), keyed by the dead letter's id; a message too large
to keep whole in 1 MB (one just under Kafka's default record limit grows as JSON) is kept cut
to fit, and its error says so. Compaction keeps each
dead letter until it is dropped, whatever the topic retention; dropping writes a tombstone
(the id with no value). Listing reads the topic from the beginning once and then only what
was added since, applying tombstones. Replaying publishes the original message to its topic
and key again with the header `tidings-replay-group: <group>`; members of other groups pass
it over.

Needs Kafka 2.4 or later (KRaft or ZooKeeper). Members' consumers reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    OffsetAndMetadata,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    for_code,
)
from aiokafka.protocol.group import LeaveGroupRequest  # type: ignore[import-untyped]

from tidings.brokers.base import BrokerBase, DeadLetter, Received, next_in_key_order
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError, InvalidCloudEvent
from tidings.store.base import url_options

__all__ = ["KafkaBroker", "KafkaBrokerError"]

log = logging.getLogger(__name__)

_BUFFER = 256  # records a member keeps per partition before pausing it
_POLL_MS = 1000  # longest wait of one fetch, so a member looks around now and then
_REPLAY_HEADER = "tidings-replay-group"
_ATTEMPTS = "tidings-attempts:"
_DEAD_LETTER_MAX = 1_000_000  # bytes: under the default 1 MiB record limit (`message.max.bytes`,
# the producer's `max_request_size`), with room for the key, headers and batch framing
_COUNTS_MAX = 16_000  # characters of one partition's handed-over counts (_BUFFER fit easily)
_EXISTS, _NOT_ALLOWED = 36, (29, 31)  # CreateTopics: exists; topic or cluster not authorized
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OPTIONS: dict[str, type] = {
    "partitions": int,
    "replication": int,
    "prefix": str,
    "session_timeout": float,
    "heartbeat_interval": float,
    "publish_timeout": float,
    "request_timeout": float,
    "connect_timeout": float,
    "client_id": str,
    "keyless": str,
    "idempotence": bool,
}
_DOWN = (KafkaError, OSError, TimeoutError)
_UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)


class KafkaBrokerError(BrokerError):
    """Kafka failed: unreachable within the bound, or refusing a request."""


def _refused_idempotence(address: str, exc: BaseException) -> KafkaBrokerError:
    """The cluster answered but gave the producer no id (InitProducerId refused)."""
    return KafkaBrokerError(
        f"Kafka at {address} refused an idempotent producer (InitProducerId: "
        f"{type(exc).__name__}); if the cluster does not allow idempotent writes, open "
        f"kafka://{address}?idempotence=false (a retried publish may then be written twice)"
    )


def _error(action: str, exc: BaseException) -> KafkaBrokerError:
    """The one place aiokafka's errors become ours."""
    if isinstance(exc, TimeoutError):
        return KafkaBrokerError(f"{action}: Kafka did not answer in time")
    name, text = type(exc).__name__, str(exc)
    text = text.removeprefix(f"{name}: ").removeprefix(name)  # aiokafka repeats it
    if isinstance(exc, KafkaConnectionError):
        text = f"no broker answered (refused, unknown host or unreachable): {text}"
    return KafkaBrokerError(f"{action}: {name}: {text}".rstrip(": "))


class KafkaBroker(BrokerBase):
    """A broker on Apache Kafka; see the module docstring for the design.

    Options (keyword or URL query): `partitions` of the topics it creates (8; keep it fixed,
    as the key to partition mapping depends on it), `replication` factor of those topics (1),
    `prefix` of group ids and of the dead-letter topic (`tidings`), `session_timeout` before a
    crashed member's partitions move (10 s; Kafka allows 6-1800 s by default),
    `heartbeat_interval` (1 s), `publish_timeout` (10 s), `request_timeout` of commits, topic
    creation and dead-letter reads (30 s), `connect_timeout` (10 s), `client_id` (`tidings`),
    `keyless` (`spread`: a random partition per record; or `sticky`: one per topic and
    publisher, in order), `idempotence` (true; false where the cluster refuses producer ids).
    Keyword-only `client_options` (TLS, SASL) go to every aiokafka client.
    """

    header_prefix = "ce_"  # the CloudEvents Kafka binding

    def __init__(
        self,
        url: str = "kafka://127.0.0.1:9092",
        *,
        codec: JSONCodec | None = None,
        source: str = "tidings",
        partitions: int = 8,
        replication: int = 1,
        prefix: str = "tidings",
        session_timeout: float = 10.0,
        heartbeat_interval: float = 1.0,
        publish_timeout: float = 10.0,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        client_id: str = "tidings",
        keyless: str = "spread",
        idempotence: bool = True,
        **client_options: Any,
    ) -> None:
        super().__init__(codec=codec, source=source)
        if not 1 <= partitions <= 10_000:
            raise ConfigurationError(f"partitions must be 1-10000, got {partitions}")
        if not 1 <= replication <= 32_767:
            raise ConfigurationError(f"replication must be at least 1, got {replication}")
        if not _PREFIX.match(prefix):
            raise ConfigurationError(
                f"prefix {prefix!r}: use 1-100 letters, digits, '.', '_' or '-' (not first)"
            )
        for name, value in (
            ("session_timeout", session_timeout),
            ("heartbeat_interval", heartbeat_interval),
            ("publish_timeout", publish_timeout),
            ("request_timeout", request_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be positive, got {value}")
        if keyless not in ("sticky", "spread"):
            raise ConfigurationError(f"keyless is 'sticky' or 'spread', got {keyless!r}")
        if heartbeat_interval >= session_timeout:
            raise ConfigurationError(
                f"heartbeat_interval ({heartbeat_interval}) must be below "
                f"session_timeout ({session_timeout})"
            )
        self.url = url.split("?", 1)[0]
        self.servers = _servers(self.url)
        self.address = ",".join(self.servers)
        self.partitions = partitions
        self.replication = replication
        self.prefix = prefix
        self.dead_letter_topic = f"{prefix}.dead-letters"
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat_interval
        self.publish_timeout = publish_timeout
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.client_id = client_id
        self.keyless = keyless
        self.idempotence = idempotence
        self._keyless_partition: dict[str, int] = {}  # topic -> where keyless records go
        self._client_options = client_options
        self._producer: Any = None
        self._admin: Any = None
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._declared: set[tuple[str, str]] = set()
        self._declare_lock = asyncio.Lock()
        self._consumers: dict[str, _Consumer] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._dead_table = _Table(self, self.dead_letter_topic, self._apply_dead_letter)
        self._attempts: dict[str, str] = {}  # "<group id>|<partition>" -> encoded counts
        self._attempts_table = _Table(self, f"{prefix}.attempts", self._apply_attempts)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaBroker:
        if urlsplit(url).scheme.lower() != "kafka":
            raise ConfigurationError(f"a Kafka broker URL starts with 'kafka://', got {url!r}")
        return cls(url, **(url_options(url, _OPTIONS) | options))

    def group_id(self, topic: str, group: str) -> str:
        """The Kafka consumer group of `group` on `topic` (names never contain `:`)."""
        return f"{self.prefix}:{topic}:{group}"

    def _options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": list(self.servers),
            "client_id": self.client_id,
            **self._client_options,
        }

    def _consumer(self, group_id: str | None) -> Any:
        return AIOKafkaConsumer(
            **self._options(),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # no committed offset: read all rather than skip
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            max_poll_records=_BUFFER,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        self._admin = AIOKafkaAdminClient(
            **self._options(), request_timeout_ms=int(self.request_timeout * 1000)
        )
        self._producer = AIOKafkaProducer(
            **self._options(),
            enable_idempotence=self.idempotence,
            acks="all",
            request_timeout_ms=int(self.publish_timeout * 1000),
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._admin.start()  # first: a cluster that answers it is reachable
                try:
                    await self._producer.start()
                except KafkaError as exc:
                    if self.idempotence and not isinstance(exc, _UNREACHABLE):
                        raise _refused_idempotence(self.address, exc) from exc
                    raise
            await self._ensure_topic(self.dead_letter_topic, compacted=True)
        except BaseException as exc:
            await self._stop_clients()
            if isinstance(exc, _DOWN):
                raise _error(f"cannot connect to Kafka at {self.address}", exc) from exc
            raise

    async def _close(self) -> None:
        for member in list(self._consumers):
            await self._leave_member(member)
        await self._stop_clients()

    async def _stop_clients(self) -> None:
        for table in (self._dead_table, self._attempts_table):
            await table.close()
        if self._producer is not None:
            with contextlib.suppress(*_DOWN):
                async with asyncio.timeout(self.request_timeout):
                    await self._producer.stop()
        if self._admin is not None:
            with contextlib.suppress(*_DOWN):
                await self._admin.close()
        self._producer = self._admin = None

    async def _ensure_topic(self, topic: str, *, compacted: bool = False) -> None:
        """Create `topic` unless this broker saw it already (it may exist: that is fine)."""
        if topic in self._topics:
            return
        async with self._topic_lock:
            if topic in self._topics:
                return
            new = (
                NewTopic(topic, 1, self.replication, topic_configs={"cleanup.policy": "compact"})
                if compacted
                else NewTopic(topic, self.partitions, self.replication)
            )
            try:
                async with asyncio.timeout(self.request_timeout):
                    response = await self._admin.create_topics([new])
            except _DOWN as exc:
                raise _error(f"cannot create topic {topic!r}", exc) from exc
            for name, code, *message in response.topic_errors:
                if code in _NOT_ALLOWED:  # not ours to create: use it if it exists
                    log.debug("kafka broker: may not create topic %s; using it as it is", name)
                elif code not in (0, _EXISTS):
                    reason = " ".join(str(m) for m in message if m)
                    raise KafkaBrokerError(
                        f"cannot create topic {name!r}: {for_code(code).__name__} {reason}".strip()
                    )
            self._topics.add(topic)

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        if topic == self.dead_letter_topic:
            raise ConfigurationError(f"{topic!r} holds the dead letters; publish elsewhere")
        await self._ensure_topic(topic)
        await self._send(topic, [to_record(m, self.header_prefix) for m in messages])

    async def _send(self, topic: str, records: Sequence[_Record]) -> None:
        """Send in order and wait until Kafka has them all, within `publish_timeout`."""
        try:
            async with asyncio.timeout(self.publish_timeout):
                if len(records) == 1 and (records[0][0] is not None or self.keyless == "spread"):
                    key, value, headers = records[0]  # the common case: no gather
                    await (await self._producer.send(topic, value, key=key, headers=headers))
                    return
                sent = []
                for key, value, headers in records:
                    partition = None
                    if key is None and self.keyless == "sticky":
                        partition = await self._sticky(topic)
                    sent.append(
                        await self._producer.send(
                            topic, value, key=key, partition=partition, headers=headers
                        )
                    )
                for outcome in await asyncio.gather(*sent, return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
        except _DOWN as exc:
            raise _error(f"cannot publish to {topic!r} on Kafka at {self.address}", exc) from exc

    async def _sticky(self, topic: str) -> int:
        """The partition this publisher's keyless records of `topic` go to."""
        partition = self._keyless_partition.get(topic)
        if partition is None:
            numbers = await self._producer.partitions_for(topic)
            partition = self._keyless_partition[topic] = random.choice(sorted(numbers))
        return partition

    # -- groups and members ----------------------------------------------------------------

    async def _declare(self, topic: str, group: str) -> None:
        if (topic, group) in self._declared:
            return
        async with self._declare_lock:
            if (topic, group) in self._declared:
                return
            await self._ensure_topic(topic)
            try:
                async with asyncio.timeout(self.request_timeout):
                    await self._start_at_end(topic, self.group_id(topic, group))
            except _DOWN as exc:
                raise _error(f"cannot declare group {group!r} on {topic!r}", exc) from exc
            self._declared.add((topic, group))

    async def _start_at_end(self, topic: str, group_id: str) -> None:
        """Commit the end offsets of the partitions the group has no offset for."""
        numbers = await self._producer.partitions_for(topic)
        partitions = [TopicPartition(topic, n) for n in sorted(numbers)]
        committed = await self._admin.list_consumer_group_offsets(group_id, partitions=partitions)
        missing = [tp for tp in partitions if tp not in committed or committed[tp].offset < 0]
        if not missing:
            return
        consumer = self._consumer(group_id)
        try:
            await consumer.start()
            consumer.assign(missing)
            ends = await consumer.end_offsets(missing)
            try:
                await consumer.commit({tp: OffsetAndMetadata(ends[tp], "") for tp in missing})
            except CommitFailedError:  # members joined meanwhile: they read from the start
                log.info("kafka broker: %s got members while being declared", group_id)
        finally:
            await consumer.stop()

    async def _attempts_of(
        self, group_id: str, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, dict[int, int]]:
        """The delivery counts a previous owner of `partitions` handed over."""
        try:
            await self._attempts_table.read()
        except KafkaBrokerError as exc:  # only the counts are lost: attempt 1 again
            log.warning("kafka broker: cannot read the attempts of %s: %s", group_id, exc)
            return {}
        return {
            tp: decode_attempts(self._attempts.get(_attempts_key(group_id, tp), ""))
            for tp in partitions
        }

    async def _hand_over_attempts(
        self, group_id: str, counts: Mapping[TopicPartition, str]
    ) -> None:
        """Keep the delivery counts of unfinished records for the partitions' next owners."""
        items: dict[str, bytes | None] = {}
        for tp, encoded in counts.items():
            key = _attempts_key(group_id, tp)
            if encoded or self._attempts.get(key):
                items[key] = encoded.encode() or None
        if items:
            await self._attempts_table.put_many(items)

    def _apply_attempts(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._attempts.pop(key, None)
        else:
            self._attempts[key] = value.decode("utf-8", "replace")

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        c = _Consumer(self, topic, group, self.group_id(topic, group), max(1, prefetch))
        self._consumers[member] = c
        await c.start()
        while not (c.left or self._closed):
            c.changed.clear()  # before looking: a wake-up meanwhile is not lost
            received, soonest = c.take(time.monotonic())
            if received is not None:
                yield received
                continue
            timeout = 1.0 if soonest is None else max(0.001, soonest - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, 1.0)):
                    await c.changed.wait()

    async def _leave(self, topic: str, group: str, member: str) -> None:
        await self._leave_member(member)

    async def _leave_member(self, member: str) -> None:
        """Leave once, to the end even if the caller is cancelled meanwhile (a member left
        half-way would hold its partitions until the session times out)."""
        consumer = self._consumers.get(member)
        if consumer is None:
            return
        if consumer.leaving is None:
            consumer.leaving = asyncio.create_task(consumer.leave())
            consumer.leaving.add_done_callback(lambda _: self._consumers.pop(member, None))
        await asyncio.shield(consumer.leaving)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        await self._declare(dead.topic, dead.group)
        key, value, headers = to_record(dead.message, self.header_prefix)
        headers.append((_REPLAY_HEADER, dead.group.encode()))
        await self._send(dead.topic, [(key, value, headers)])

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        headers = [("content-type", b"application/json")]
        await self._send(
            self.dead_letter_topic, [(dead.id.encode(), dead_letter_value(dead), headers)]
        )

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        await self._dead_table.put(dead_letter_id, None)
        self._dead.pop(dead_letter_id, None)

    async def _dead_letters(self) -> list[DeadLetter]:
        await self._dead_table.read()
        return sorted(self._dead.values(), key=lambda dead: (dead.failed_at, dead.id))

    def _apply_dead_letter(self, key: str, value: bytes | None) -> None:
        apply_dead_letter(self._dead, key.encode(), value)


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


# -- a member ------------------------------------------------------------------------------


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
        self.broker = broker
        self.topic = topic
        self.group = group
        self.group_id = group_id
        self.prefetch = prefetch
        self.consumer: Any = None
        self.partitions: dict[Any, _Partition] = {}
        self.held = 0
        self.changed = asyncio.Event()  # something to hand out, or room to hand it out
        self.settled = asyncio.Event()  # a held record was acked or nacked
        self.left = False
        self.epoch = 0  # bumped on every revocation
        self.turn = 0
        self.pump: asyncio.Task[None] | None = None
        self.leaving: asyncio.Task[None] | None = None
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

    def wake(self) -> None:
        self.changed.set()

    # handing out

    def take(self, now: float) -> tuple[_KafkaReceived | None, float | None]:
        """The next record this member may hand out, or when to look again."""
        if self.held >= self.prefetch:
            return None, None
        soonest: float | None = None
        order = list(self.partitions.values())
        if order:
            self.turn = (self.turn + 1) % len(order)
            order = order[self.turn :] + order[: self.turn]
        unmarked = False
        for part in order:
            entry, when = next_in_key_order(part.entries, now)
            if entry is not None and entry.marked <= entry.attempts:
                unmarked = True  # this delivery is counted first (`_write_marks`)
            elif entry is not None:
                entry.attempts += 1
                entry.holder = _KafkaReceived(self, part, entry)
                self.held += 1
                self.ahead -= 1
                if self.ahead <= self.prefetch // 2 and self.unmarked:
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
            order = list(self.partitions.values())
            first = (self.turn + 1) % len(order) if order else 0
            order = order[first:] + order[:first]
            for part in order:  # first what `take` would hand out next: it waits for these
                entry, _ = next_in_key_order(part.entries, now)
                if entry is not None and entry.marked <= entry.attempts:
                    plan[part.tp] = [entry]
            budget = self.prefetch - self.ahead - len(plan)
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
        if entry.holder is not None:
            entry.holder = None
            self.held -= 1
        self.wake()
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


async def _leave_generation_zero(consumer: Any) -> None:
    """Send LeaveGroup for a member of generation 0, which aiokafka's `stop` skips.

    Apache Kafka numbers a group's first generation 1, and aiokafka leaves only from
    generation 1 on; some Kafka-protocol brokers (Tansu) start at 0, so without this a member
    that leaves stays in the group until its session times out, and the group's next
    rebalance waits for it."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "generation", None) != 0:
        return
    if not coordinator.member_id or coordinator.coordinator_id is None:
        return
    with contextlib.suppress(KafkaError):
        await coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells a member when Kafka takes its partitions away (or gives it new ones)."""

    def __init__(self, member: _Consumer) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.member.revoke()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.member.wake()  # the records come with the next fetch


class _KafkaReceived(Received):
    def __init__(self, member: _Consumer, part: _Partition, entry: _Entry) -> None:
        self.member = member
        self.part = part
        self.entry = entry
        self.message = entry.message
        self.attempt = entry.attempts
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


# -- bookkeeping (no I/O) ------------------------------------------------------------------


class OffsetTracker:
    """The offsets of one partition a member read, and its commit point.

    The commit point is the offset after the longest prefix of settled (acked, dead-lettered
    or passed over) offsets: committing it never skips a record still in work, whatever order
    the acks come in. Offsets must be read in increasing order; gaps are fine (compaction,
    transaction markers)."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # read, in order, not yet below the commit point
        self._settled: set[int] = set()
        self._position: int | None = None
        self.last: int | None = None  # the highest offset read

    def read(self, offset: int) -> None:
        if self.last is not None and offset <= self.last:
            raise ValueError(f"offset {offset} read after {self.last}")
        self._pending.append(offset)
        self.last = offset

    def settle(self, offset: int) -> int | None:
        """Mark `offset` done; the new commit point if it moved, else None."""
        if offset not in self._pending or offset in self._settled:
            return None
        self._settled.add(offset)
        moved = None
        while self._pending and self._pending[0] in self._settled:
            done = self._pending.popleft()
            self._settled.discard(done)
            moved = self._position = done + 1
        return moved

    @property
    def position(self) -> int | None:
        """Where the next owner should start: the first unsettled offset read, or after
        the last settled one; None before anything was read."""
        return self._pending[0] if self._pending else self._position


def encode_attempts(attempts: Mapping[int, int]) -> str:
    """The handed-over delivery counts of unfinished offsets (zeros left out,
    cut at `_COUNTS_MAX` characters: the rest restart at 1)."""
    parts: list[str] = []
    size = len(_ATTEMPTS)
    for offset, count in sorted(attempts.items()):
        if count > 0:
            part = f"{offset}={count}"
            size += len(part) + 1
            if size > _COUNTS_MAX:
                break
            parts.append(part)
    return _ATTEMPTS + ",".join(parts) if parts else ""


def decode_attempts(metadata: str) -> dict[int, int]:
    """The counts `encode_attempts` wrote; anything else (another client's metadata) is {}."""
    if not metadata.startswith(_ATTEMPTS):
        return {}
    counts: dict[int, int] = {}
    for part in metadata[len(_ATTEMPTS) :].split(","):
        offset, _, count = part.partition("=")
        if offset.isdigit() and count.isdigit():
            counts[int(offset)] = int(count)
    return counts


_Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def to_record(message: Message, prefix: str = "ce_") -> _Record:
    """A message as a Kafka record: key, value, and the binary-mode headers."""
    headers = [(name, value.encode()) for name, value in message.binary_headers(prefix).items()]
    key = None if message.key is None else message.key.encode()
    return key, message.data, headers


def from_record(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    prefix: str = "ce_",
) -> Message:
    """The message of a Kafka record; one that is no CloudEvent keeps its headers and body
    for the consumer to dead-letter."""
    text = {name: (raw or b"").decode("utf-8", "replace") for name, raw in headers}
    key_text = None if key is None else key.decode("utf-8", "replace")
    body = value or b""
    try:
        return Message.from_binary(topic, text, body, prefix=prefix, key=key_text)
    except InvalidCloudEvent:
        attributes = {
            name[len(prefix) :].lower(): raw
            for name, raw in text.items()
            if name.lower().startswith(prefix)
        }
        return Message(topic, attributes, body, key_text, text)


def dead_letter_value(dead: DeadLetter) -> bytes:
    """The value of a dead letter's record: its `to_dict` JSON (the key is its id), cut to
    fit a record when the message was too large to keep whole (see `DeadLetter.to_json`)."""
    return dead.to_json(_DEAD_LETTER_MAX, limit_name="Kafka's default record size")


def apply_dead_letter(dead: dict[str, DeadLetter], key: bytes | None, value: bytes | None) -> None:
    """Apply one record of the dead-letter topic: a dead letter, or (no value) its removal."""
    if key is None:
        return
    dead_letter_id = key.decode("utf-8", "replace")
    if value is None:
        dead.pop(dead_letter_id, None)
        return
    try:
        dead[dead_letter_id] = DeadLetter.from_dict(json.loads(value))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("kafka broker: skipping unreadable dead letter %s: %s", dead_letter_id, exc)


def _offset_of(entry: _Entry) -> int:
    return entry.offset


def _attempts_key(group_id: str, tp: TopicPartition) -> str:
    """The key of a partition's handed-over counts (group ids never contain `|`)."""
    return f"{group_id}|{tp.topic}|{tp.partition}"


def _servers(url: str) -> list[str]:
    """`host:port` of each server in `kafka://a:9092,b:9092` (port 9092 by default)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    netloc, _, path = rest.partition("/")
    if path:
        raise ConfigurationError(f"a Kafka URL has no path, got {url!r}")
    if "@" in netloc:
        raise ConfigurationError(
            "credentials do not go in a Kafka URL; pass sasl_plain_username and "
            "sasl_plain_password (and security_protocol) as keyword options"
        )
    servers = []
    for server in netloc.split(","):
        if not server:
            continue
        if server.startswith("["):  # [IPv6]:port
            host, _, port = server[1:].partition("]")
            port = port.removeprefix(":")
            host = f"[{host}]"
        else:
            host, _, port = server.rpartition(":") if ":" in server else (server, "", "")
        if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ConfigurationError(f"bad Kafka server {server!r} in {url!r}: use host:port")
        servers.append(f"{host}:{port or 9092}")
    return servers or ["127.0.0.1:9092"]
