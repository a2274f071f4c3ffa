"""`KafkaBroker`: connecting, publishing, declaring groups and topics, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    CommitFailedError,
    KafkaError,
    for_code,
)

from tidings.brokers.base import BrokerBase, DeadLetter, Received, url_settings
from tidings.brokers.envelope import Message
from tidings.brokers.handout import wait_set
from tidings.brokers.kafka.errors import (
    _DOWN,
    _UNREACHABLE,
    KafkaBrokerError,
    _error,
    _refused_idempotence,
)
from tidings.brokers.kafka.member import _BUFFER, _Consumer
from tidings.brokers.kafka.records import (
    _REPLAY_HEADER,
    _attempts_key,
    _Record,
    apply_dead_letter,
    dead_letter_value,
    decode_attempts,
    to_record,
)
from tidings.brokers.kafka.table import _Table
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError

log = logging.getLogger(__name__)

_EXISTS, _NOT_ALLOWED = 36, (29, 31)  # CreateTopics: exists; topic or cluster not authorized
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
        # the topics it creates
        self.partitions, self.replication, self.prefix = partitions, replication, prefix
        self.dead_letter_topic = f"{prefix}.dead-letters"
        # groups: how soon a crashed member's partitions move
        self.session_timeout, self.heartbeat_interval = session_timeout, heartbeat_interval
        # the clients and publishing
        self.publish_timeout, self.request_timeout = publish_timeout, request_timeout
        self.connect_timeout, self.client_id = connect_timeout, client_id
        self.keyless, self.idempotence = keyless, idempotence
        self._keyless_partition: dict[str, int] = {}  # topic -> where keyless records go
        self._client_options = client_options
        self._producer: Any = None
        self._admin: Any = None
        self._topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._declared: set[tuple[str, str]] = set()
        self._declare_lock = asyncio.Lock()
        self._dead: dict[str, DeadLetter] = {}
        self._dead_table = _Table(self, self.dead_letter_topic, self._apply_dead_letter)
        self._attempts: dict[str, str] = {}  # "<group id>|<partition>" -> encoded counts
        self._attempts_table = _Table(self, f"{prefix}.attempts", self._apply_attempts)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaBroker:
        wrong = "a Kafka broker URL starts with 'kafka://'"
        return cls(url, **url_settings(cls, url, ("kafka",), wrong, options))

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
        await self._leave_all()
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
        self._join(member, c.leave)
        await c.start()
        while not (c.left or self._closed):
            c.changed.clear()  # before looking: a wake-up meanwhile is not lost
            received, soonest = c.take(time.monotonic())
            if received is not None:
                yield received
                continue
            timeout = 1.0 if soonest is None else max(0.001, soonest - time.monotonic())
            await wait_set(c.changed, min(timeout, 1.0))

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
