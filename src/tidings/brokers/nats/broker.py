"""`NATSBroker`: the URL and options, connecting, publishing, receiving through members,
and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidings.brokers.base import BrokerBase, url_settings
from tidings.brokers.dead_letters import DeadLetter, DeadLetterNotFound
from tidings.brokers.delivery import Received
from tidings.brokers.envelope import Message
from tidings.brokers.handout import wait_set
from tidings.brokers.nats.errors import _NATS_ERRORS, _describe
from tidings.brokers.nats.member import _Puller
from tidings.brokers.nats.records import _KEY_HEADER, _wire
from tidings.brokers.nats.topology import _ALL, _ANY, _RETENTIONS, _token, _Topology
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError, InvalidCloudEvent

__all__ = ["NATSBroker"]

log = logging.getLogger("tidings.brokers.nats")

_UNTAKEN_KEPT = 100_000  # given-back messages remembered for their attempt count
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DEAD_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_MAX_OUTSTANDING_PINGS = 2  # unanswered pings before nats-py drops the link as stale


class NATSBroker(_Topology, BrokerBase):
    """A broker on NATS JetStream; see docs/brokers.md for the design.

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
        # the stream: its name, subjects, how long it keeps messages
        self.stream, self.dead_letter_stream = stream, f"{stream}_DLQ"
        self.prefix, self.shards, self.retention = prefix, shards, retention
        self.max_age, self.dead_letter_max_age = max_age, dead_letter_max_age
        # the groups: redelivery, how long an unused one lives, pull requests
        self.ack_wait, self.group_expiry, self.pull_expires = ack_wait, group_expiry, pull_expires
        # the connection and publishing
        self.max_in_flight, self.ping_interval = max_in_flight, ping_interval
        self.publish_timeout, self.publish_attempts = publish_timeout, publish_attempts
        self.connect_timeout = connect_timeout
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
        wrong = "a NATS broker URL starts with 'nats://'"
        return cls(url, **url_settings(cls, url, ("nats",), wrong, options))

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
        await self._leave_all()
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
        """Publish and wait for the stream's ack; retried (same message id) a few times.

        A request (`js.publish`), not `publish_async` with its ack awaited: nats-py 2.x
        raises some of JetStream's error replies (400: headers over 64 KB) inside the async
        publish's reply handler instead of setting them on the future, which then never
        resolves, so a refused message would read as a timeout."""
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

    # -- groups and members ----------------------------------------------------------------

    def _count_untaken(self, sequence: int) -> None:
        if len(self._untaken) >= _UNTAKEN_KEPT:
            del self._untaken[next(iter(self._untaken))]  # the oldest
        self._untaken[sequence] = self._untaken.get(sequence, 0) + 1

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        puller = _Puller(self, topic, group, max(1, prefetch))
        self._pullers[member] = puller
        self._join(member, lambda: self._leave_puller(member))
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
                await wait_set(puller.wake, puller.patience())

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


def _servers(url: str) -> list[str]:
    rest = url.split("://", 1)[1] if "://" in url else url
    servers = [f"nats://{part}" for part in rest.strip("/").split(",") if part]
    return servers or ["nats://127.0.0.1:4222"]


def _address(server: str) -> str:
    parts = urlsplit(server)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 4222}"
