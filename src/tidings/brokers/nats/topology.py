"""What `NATSBroker` declares on the server: the streams, each group's durable consumers
(one per lane), and the subjects `tidings.<topic>.<lane>.<target>` they filter."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import zlib
from typing import TYPE_CHECKING

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from tidings.brokers.nats.errors import _NATS_ERRORS, _describe
from tidings.core.errors import BrokerError, ConfigurationError

log = logging.getLogger("tidings.brokers.nats")

_ANY = "any"  # the lane of keyless messages
_ALL = "_"  # the target of a message for every group (no group name starts with "_")
_STREAM_IN_USE = 10058  # JetStream: stream name already in use with another configuration
_RETENTIONS = {"limits": api.RetentionPolicy.LIMITS, "interest": api.RetentionPolicy.INTEREST}


class _Topology:
    """`NATSBroker`'s streams, consumers and subjects (a mixin of the broker class)."""

    if TYPE_CHECKING:
        address: str
        stream: str
        dead_letter_stream: str
        prefix: str
        retention: str
        max_age: float
        dead_letter_max_age: float
        shards: int
        ack_wait: float
        group_expiry: float
        max_in_flight: int
        _lanes: list[str]

        def _connection(self) -> tuple[Client, JetStreamContext]: ...

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

    def _lane(self, key: str | None) -> str:
        return _ANY if key is None else str(zlib.crc32(key.encode()) % self.shards)

    def _subject(self, topic: str, lane: str, target: str) -> str:
        return f"{self.prefix}.{_token(topic)}.{lane}.{target}"

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


def _token(name: str) -> str:
    """A topic or group name as one subject token (names never contain `~`)."""
    return name.replace(".", "~")


@functools.lru_cache(maxsize=4096)
def _group_name(topic: str, group: str) -> str:
    """The durable consumers' name stem for `group` of `topic` (readable, then unique)."""
    digest = hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", group)[:40]
    return f"{readable}-{digest}"


def _retention_name(policy: api.RetentionPolicy | None) -> str:
    return next((name for name, p in _RETENTIONS.items() if p == policy), str(policy))
