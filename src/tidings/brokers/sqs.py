"""`SQSBroker` (SNS topics fanning out to SQS queues, `sqs://?region=…`) and
`EventBridgeBroker` (an event bus with a rule per group, `eventbridge://?region=…`), on
aiobotocore. `endpoint_url=` points both at another endpoint (moto, LocalStack); without it
the same code runs against AWS, with credentials from botocore's usual chain (or the
`access_key_id`/`secret_access_key`/`profile` options).

SNS+SQS. A topic is the SNS FIFO topic `<prefix>-<topic>-<hash>.fifo`; a group is an SQS FIFO
queue subscribed to it with raw message delivery, created with the subscription when the
group is declared, so it gets what is published after that. Every topic is FIFO, keyed or
not: FIFO is fixed when a topic or queue is created, and a topic carries both. A keyed
message's message group id is its key (hashed when SQS would refuse it), which is what keeps
one key in publish order and in one member's hands at a time; a keyless message gets a group
of its own (its event id), so keyless messages are not serialised. The de-duplication id is
the event id (a hash of the body for a message without one): a publish retried within SNS's
five minutes is delivered once. The price of FIFO is throughput: see the SNS and SQS FIFO
quotas (SQS high-throughput mode applies). Messages are CloudEvents in structured mode (one
JSON body; SQS allows only 10 message attributes), plus the attribute `tidings-key`.

A member long-polls its group's queue (`wait_time`, at most one receive in flight, only
while it has room for `prefetch` messages) and keeps what it received in order; it hands a
message out when no earlier one of its key is in hand (`next_in_key_order`). Ack deletes the
message, `nack(delay)` makes it visible again after `ceil(delay)` seconds (later messages of
its key that the member holds go back with it), and `attempt` is SQS's
`ApproximateReceiveCount`, less the receives this process took without handing the message
out. A heartbeat keeps every message a member holds invisible (`visibility_timeout / 3`),
so only a crashed member's messages wait for `visibility_timeout`; a member that leaves
makes its messages visible again at once (after its receive in flight, if any, returns).

Dead letters. A message tidings gives up on is kept as the `DeadLetter.to_dict` JSON record
in S3, `s3://<bucket>/<prefix>/<topic>/<id>.json` (`bucket` defaults to
`<prefix>-dlq-<account>-<region>`, created on the first dead letter): S3 lists by topic,
reads, and deletes one record by key, is durable, and keeps records past SQS's 14 days.
Every group queue also has an SQS redrive policy to its own FIFO queue
`<prefix>-dlq-<hash>-…fifo` after `max_receives` receives, for messages that keep coming
back without tidings recording anything (a consumer crashing on them); listing the dead
letters of a topic first moves what SQS put there into records ("SQS moved it …"), deleting
it from the SQS dead-letter queue. Replaying sends the message straight to the group's
queue (a new de-duplication id), so only that group sees it again.

EventBridge. Publishing is `PutEvents` to the bus `bus` (default: the prefix, created when
opening; `default` uses the account's bus): `Source` is the CloudEvent's source,
`DetailType` its type, `Detail` the structured CloudEvent with the extension attribute
`tidingstopic` (removed again on receipt). A group is the rule `<prefix>-…` matching that
topic, created at declare, with the group's SQS FIFO queue as target (`InputPath` `$.detail`,
content-based de-duplication, as EventBridge requires). A target's `MessageGroupId` is fixed,
so each group queue is one message group: a group's messages are handed to one member's
batch at a time (no parallelism inside a group), in the order they reached the queue.
EventBridge does not promise delivery order: on AWS, events with the same key can reach the
queue, and so the group, out of publish order; moto delivers in order. Consuming, acks and
dead letters are as above.

Queue names are derived from topic and group, so every client of a prefix must use the same
`prefix`; an existing queue keeps its attributes (a second client with another
`visibility_timeout` uses it as it is). Queue policies let the topic (or rule) send to the
queue. Topics, queues, rules and records are never deleted by tidings.

On moto (5.x), use `wait_time=0`: moto takes a FIFO queue's in-flight message groups once
when a receive starts, so a long poll (or two receives at the same instant) can hand a
group's next message to a second member while the first still holds the one before, which
SQS does not do. The test suite's moto server serialises its SQS operations for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import botocore.exceptions  # type: ignore[import-untyped]
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]

from tidings.brokers.base import (
    BrokerBase,
    DeadLetter,
    DeadLetterNotFound,
    Received,
    next_in_key_order,
)
from tidings.brokers.envelope import Message
from tidings.core.codec import JSONCodec
from tidings.core.errors import BrokerError, ConfigurationError, InvalidCloudEvent
from tidings.store.base import url_options

__all__ = ["EventBridgeBroker", "SQSBroker", "SQSBrokerError"]

log = logging.getLogger("tidings.brokers.sqs")

_KEY_ATTRIBUTE = "tidings-key"
_TOPIC_ATTRIBUTE = "tidingstopic"  # EventBridge: the CloudEvent extension rules match on
_TARGET_GROUP = "tidings"  # EventBridge: the fixed message group id of every target
_PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUS = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
_GROUP_ID = re.compile(r"^[A-Za-z0-9!-/:-@\[-`{-~]{1,128}$")  # what SQS takes as a group id
_DEAD_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")
_BATCH = 10  # entries in one SNS, SQS or EventBridge batch call
_BATCH_BYTES = 240_000  # below the 256 KiB a batch call may carry
_MAX_VISIBILITY = 43_200  # SQS: 12 hours
_UNTAKEN_KEPT = 100_000  # given-back messages remembered for their attempt count
_OPTIONS: dict[str, type] = {
    "endpoint_url": str,
    "region": str,
    "prefix": str,
    "visibility_timeout": int,
    "wait_time": int,
    "poll_interval": float,
    "max_receives": int,
    "bucket": str,
    "connect_timeout": float,
    "publish_attempts": int,
    "access_key_id": str,
    "secret_access_key": str,
    "profile": str,
}
_FAILURES = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)
_GONE = {
    "ReceiptHandleIsInvalid",
    "InvalidParameterValue",
    "AWS.SimpleQueueService.NonExistentQueue",
}


class SQSBrokerError(BrokerError):
    """AWS failed: unreachable after botocore's bounded retries, or it refused a request."""


@dataclass(eq=False)
class _Entry:
    """A received message a member holds, handed out (`holder`) or not yet."""

    message: Message
    message_id: str  # SQS's, the same on every receive
    receipt: str  # this receive's handle
    count: int  # ApproximateReceiveCount
    holder: bool = False
    not_before: float = 0.0  # never set: a nacked message goes back to SQS


@dataclass(eq=False)
class _Member:
    topic: str
    group: str
    name: str
    queue_url: str
    prefetch: int
    entries: list[_Entry] = field(default_factory=list)  # in order of receipt
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    receiving: asyncio.Task[None] | None = None
    heartbeat: asyncio.Task[None] | None = None
    left: bool = False

    @property
    def room(self) -> int:
        return self.prefetch - len(self.entries)


class _SQSReceived(Received):
    def __init__(self, broker: SQSBroker, member: _Member, entry: _Entry, attempt: int) -> None:
        self.broker = broker
        self.member = member
        self.entry = entry
        self.message = entry.message
        self.attempt = attempt

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
                e for e in member.entries if e.message.key == entry.message.key and not e.holder
            ]
            for later in back[1:]:
                member.entries.remove(later)
                self.broker._count_untaken(later.message_id)
        await self.broker._set_visibility(member.queue_url, back, seconds)

    def _release(self) -> bool:
        member = self.member
        if self.entry not in member.entries:
            return False
        member.entries.remove(self.entry)
        member.changed.set()
        return True


class SQSBroker(BrokerBase):
    """A broker on SNS FIFO topics and SQS FIFO queues; see the module docstring.

    Options (keyword or URL query): `endpoint_url`, `region`, `prefix` of every name
    (`tidings`; 1-24 lowercase letters, digits, `-`), `visibility_timeout` seconds before a
    crashed member's messages come back (30), `wait_time` of a long poll (20; 0 polls every
    `poll_interval`, 0.2 s), `max_receives` before SQS redrives a message (10), dead-letter
    `bucket`, `connect_timeout` (5 s), `publish_attempts` (3, botocore's retries),
    `access_key_id` with `secret_access_key`, `profile`.
    """

    scheme = "sqs"

    def __init__(
        self,
        url: str = "sqs://",
        *,
        codec: JSONCodec | None = None,
        source: str = "tidings",
        endpoint_url: str | None = None,
        region: str | None = None,
        prefix: str = "tidings",
        visibility_timeout: int = 30,
        wait_time: int = 20,
        poll_interval: float = 0.2,
        max_receives: int = 10,
        bucket: str | None = None,
        connect_timeout: float = 5.0,
        publish_attempts: int = 3,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__(codec=codec, source=source)
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ConfigurationError(
                f"prefix {prefix!r}: use 1-24 lowercase letters, digits or '-' (not first)"
            )
        if not 1 <= visibility_timeout <= _MAX_VISIBILITY:
            raise ConfigurationError(
                f"visibility_timeout must be 1-{_MAX_VISIBILITY} seconds, got {visibility_timeout}"
            )
        if not 0 <= wait_time <= 20:
            raise ConfigurationError(f"wait_time must be 0-20 seconds, got {wait_time}")
        if not 1 <= max_receives <= 1000:
            raise ConfigurationError(f"max_receives must be 1-1000, got {max_receives}")
        if poll_interval <= 0 or connect_timeout <= 0:
            raise ConfigurationError("poll_interval and connect_timeout must be positive")
        if publish_attempts < 1:
            raise ConfigurationError(f"publish_attempts must be at least 1, got {publish_attempts}")
        if bucket is not None and not _BUCKET.match(bucket):
            raise ConfigurationError(f"bucket {bucket!r} is not a valid S3 bucket name")
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigurationError("give access_key_id and secret_access_key together")
        if endpoint_url is not None and urlsplit(endpoint_url).scheme not in ("http", "https"):
            raise ConfigurationError(f"endpoint_url must be an http(s) URL, got {endpoint_url!r}")
        self.url = url.split("?", 1)[0]
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self.visibility_timeout = visibility_timeout
        self.wait_time = wait_time
        self.poll_interval = poll_interval
        self.max_receives = max_receives
        self.bucket = bucket
        self.connect_timeout = connect_timeout
        self.publish_attempts = publish_attempts
        self._credentials = (access_key_id, secret_access_key)
        self._profile = profile
        self._stack: AsyncExitStack | None = None
        self._clients: dict[str, Any] = {}
        self._account = ""
        self._partition = "aws"
        self._topics: dict[str, str] = {}  # topic -> its ARN (SNS topic; EventBridge: "")
        self._queues: dict[tuple[str, str], str] = {}  # (topic, group) -> queue URL
        self._members: dict[str, _Member] = {}
        self._bucket_ready = False
        # SQS message id -> receives this process took and gave back without handing the
        # message out: SQS counts them, `attempt` does not (another process cannot know).
        self._untaken: dict[str, int] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQSBroker:
        parts = urlsplit(url)
        if parts.scheme.lower() != cls.scheme:
            raise ConfigurationError(f"this broker's URL starts with {cls.scheme}://, got {url!r}")
        if parts.netloc:
            raise ConfigurationError(
                f"{url!r}: put the endpoint and region in the query "
                f"({cls.scheme}://?endpoint_url=…&region=…), not before it"
            )
        known = _OPTIONS | cls._extra_options()
        return cls(url, **(url_options(url, known) | options))

    @classmethod
    def _extra_options(cls) -> dict[str, type]:
        return {}

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        session = AioSession(profile=self._profile)
        access_key, secret = self._credentials
        config = AioConfig(
            connect_timeout=self.connect_timeout,
            read_timeout=self.wait_time + 15,
            retries={"max_attempts": self.publish_attempts, "mode": "standard"},
            max_pool_connections=64,
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        stack = AsyncExitStack()
        try:
            for service in self._services():
                self._clients[service] = await stack.enter_async_context(
                    session.create_client(
                        service,
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=access_key,
                        aws_secret_access_key=secret,
                        config=config,
                    )
                )
            self.region = self._clients["sqs"].meta.region_name
            identity = await self._call("sts", "get_caller_identity", "reach AWS")
            self._account = identity["Account"]
            self._partition = str(identity.get("Arn", "arn:aws:")).split(":")[1] or "aws"
            await self._prepare()
        except BaseException:
            await stack.aclose()
            raise
        if self.bucket is None:
            self.bucket = f"{self.prefix}-dlq-{self._account}-{self.region}"
        self._stack = stack

    def _services(self) -> tuple[str, ...]:
        return ("sts", "sqs", "sns", "s3")

    async def _prepare(self) -> None:
        """What opening creates beyond the clients (EventBridge: the bus)."""

    async def _close(self) -> None:
        for name in list(self._members):
            with contextlib.suppress(BrokerError):
                await self._leave_member(name)
        if self._stack is not None:
            with contextlib.suppress(*_FAILURES):
                await self._stack.aclose()

    async def _call(self, service: str, operation: str, what: str, **request: Any) -> Any:
        """One AWS request (botocore retries it); failures become `SQSBrokerError`."""
        found = self._clients.get(service)
        if found is None:
            raise SQSBrokerError(f"{type(self).__name__} is not open")
        try:
            return await getattr(found, operation)(**request)
        except botocore.exceptions.NoRegionError as exc:
            raise ConfigurationError(
                f"no AWS region: add ?region=… to the broker URL ({exc})"
            ) from exc
        except _FAILURES as exc:
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            raise SQSBrokerError(f"cannot {what} on AWS{where}: {_describe(exc)}") from exc

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        arn = await self._topic(topic)
        for batch in _batches(messages):
            entries = [
                {
                    "Id": str(index),
                    "Message": body.decode(),
                    "MessageGroupId": _group_id(message),
                    "MessageDeduplicationId": _dedup_id(message, body),
                    "MessageAttributes": _attributes(message),
                }
                for index, (message, body) in enumerate(batch)
            ]
            if len(entries) == 1:
                [entry] = entries
                entry.pop("Id")
                await self._call("sns", "publish", f"publish to {topic!r}", TopicArn=arn, **entry)
                continue
            reply = await self._call(
                "sns",
                "publish_batch",
                f"publish to {topic!r}",
                TopicArn=arn,
                PublishBatchRequestEntries=entries,
            )
            _refused(reply, f"SNS refused messages for {topic!r}")

    async def _topic(self, topic: str) -> str:
        """The topic's SNS FIFO topic ARN (created once: CreateTopic is idempotent)."""
        arn = self._topics.get(topic)
        if arn is None:
            reply = await self._call(
                "sns",
                "create_topic",
                f"create the topic {topic!r}",
                Name=f"{self.prefix}-{_readable(topic, 180)}-{_digest(topic)}.fifo",
                Attributes={"FifoTopic": "true", "ContentBasedDeduplication": "false"},
            )
            arn = self._topics[topic] = str(reply["TopicArn"])
        return arn

    # -- groups and members ----------------------------------------------------------------

    def _queue_name(self, topic: str, group: str, kind: str = "") -> str:
        stem = f"{self.prefix}-{kind}{_digest(topic)[:8]}{_digest(topic, group)[:8]}-"
        return stem + _readable(f"{topic}-{group}", 75 - len(stem)) + ".fifo"

    async def _declare(self, topic: str, group: str) -> None:
        await self._queue(topic, group)

    async def _queue(self, topic: str, group: str) -> str:
        """The group's queue URL, creating queue, dead-letter queue and route once."""
        url = self._queues.get((topic, group))
        if url is not None:
            return url
        what = f"declare group {group!r} on {topic!r}"
        tags = {"tidings:topic": topic, "tidings:group": group}
        dlq_url = await self._create_queue(
            self._queue_name(topic, group, "dlq-"),
            {"FifoQueue": "true", "MessageRetentionPeriod": "1209600"},
            tags,
            what,
        )
        dlq_arn = await self._queue_arn(dlq_url, what)
        name = self._queue_name(topic, group)
        arn = f"arn:{self._partition}:sqs:{self.region}:{self._account}:{name}"
        source = await self._route_source(topic, group)
        attributes = {
            "FifoQueue": "true",
            "ContentBasedDeduplication": "true",
            "VisibilityTimeout": str(self.visibility_timeout),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.max_receives}
            ),
            "Policy": json.dumps(_policy(arn, *source)),
        }
        url = await self._create_queue(name, attributes, tags, what)
        await self._route(topic, group, await self._queue_arn(url, what))
        self._queues[topic, group] = url
        return url

    async def _create_queue(
        self, name: str, attributes: dict[str, str], tags: dict[str, str], what: str
    ) -> str:
        try:
            reply = await self._clients["sqs"].create_queue(
                QueueName=name, Attributes=attributes, tags=tags
            )
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("QueueAlreadyExists", "QueueNameExists"):
                raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
            # It exists with other attributes (another client's options): use it as it is.
            reply = await self._call("sqs", "get_queue_url", what, QueueName=name)
        except _FAILURES as exc:
            raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
        return str(reply["QueueUrl"])

    async def _queue_arn(self, url: str, what: str) -> str:
        reply = await self._call(
            "sqs", "get_queue_attributes", what, QueueUrl=url, AttributeNames=["QueueArn"]
        )
        return str(reply["Attributes"]["QueueArn"])

    async def _route_source(self, topic: str, group: str) -> tuple[str, str]:
        """The service that sends to the group's queue and the ARN it sends from."""
        return "sns.amazonaws.com", await self._topic(topic)

    async def _route(self, topic: str, group: str, queue_arn: str) -> None:
        """Deliver the topic's messages to the group's queue: an SNS subscription."""
        await self._call(
            "sns",
            "subscribe",
            f"subscribe group {group!r} to {topic!r}",
            TopicArn=await self._topic(topic),
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )

    async def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        m = _Member(topic, group, member, await self._queue(topic, group), max(1, prefetch))
        self._members[member] = m
        m.heartbeat = asyncio.create_task(self._keep_invisible(m))
        while not (m.left or self._closed):
            entry, _ = next_in_key_order(m.entries, 0.0)
            if entry is not None:
                entry.holder = True
                attempt = max(1, entry.count - self._untaken.get(entry.message_id, 0))
                yield _SQSReceived(self, m, entry, attempt)
                continue
            m.changed.clear()
            if m.receiving is None and m.room > 0:
                m.receiving = asyncio.create_task(self._fetch(m, min(_BATCH, m.room)))
            await m.changed.wait()  # a cancelled wait leaves the receive running

    async def _fetch(self, m: _Member, count: int) -> None:
        """One receive into the member's entries; it survives the waiter's cancellation, so
        what SQS hands out always reaches the member (and goes back when it leaves)."""
        try:
            reply = await self._call(
                "sqs",
                "receive_message",
                f"receive from {m.topic!r}/{m.group!r}",
                QueueUrl=m.queue_url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=self.wait_time,
                AttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=[_KEY_ATTRIBUTE],
            )
            for raw in reply.get("Messages", []):
                m.entries.append(
                    _Entry(
                        self._decode(m.topic, raw),
                        str(raw["MessageId"]),
                        str(raw["ReceiptHandle"]),
                        int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                    )
                )
            if not reply.get("Messages") and not self.wait_time and not m.left:
                await asyncio.sleep(self.poll_interval)
        except SQSBrokerError as exc:
            if not (m.left or self._closed):
                log.warning("%s/%s: %s; retrying", m.topic, m.group, exc)
                if "NonExistentQueue" in str(exc):
                    self._queues.pop((m.topic, m.group), None)
                    with contextlib.suppress(BrokerError):
                        m.queue_url = await self._queue(m.topic, m.group)
                await asyncio.sleep(1.0)
        finally:
            m.receiving = None
            m.changed.set()

    def _decode(self, topic: str, raw: dict[str, Any]) -> Message:
        """The message in an SQS body: a structured CloudEvent (inside an EventBridge
        event when one sent it); anything else is kept for the consumer to dead-letter."""
        body = str(raw.get("Body", "")).encode()
        key_attribute = raw.get("MessageAttributes", {}).get(_KEY_ATTRIBUTE)
        key = key_attribute.get("StringValue") if key_attribute else None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read
            return Message(topic, {}, body, key)
        if isinstance(document, dict) and "detail-type" in document and "detail" in document:
            body = json.dumps(document["detail"]).encode()  # EventBridge's envelope
        try:
            message = Message.from_structured(topic, body, key=key)
        except InvalidCloudEvent:
            return Message(topic, {}, body, key)
        if _TOPIC_ATTRIBUTE in message.attributes:
            attributes = {k: v for k, v in message.attributes.items() if k != _TOPIC_ATTRIBUTE}
            message = Message(topic, attributes, message.data, message.key, message.headers)
        return message

    async def _keep_invisible(self, m: _Member) -> None:
        """Extend the visibility of what the member holds, so only a crash lets it go."""
        interval = max(0.5, self.visibility_timeout / 3)
        while not m.left:
            await asyncio.sleep(interval)
            try:
                await self._set_visibility(m.queue_url, list(m.entries), self.visibility_timeout)
            except BrokerError as exc:
                log.warning("%s/%s: cannot extend visibility: %s", m.topic, m.group, exc)

    async def _set_visibility(self, queue_url: str, entries: list[_Entry], seconds: int) -> None:
        for start in range(0, len(entries), _BATCH):
            batch = entries[start : start + _BATCH]
            reply = await self._call(
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

    def _count_untaken(self, message_id: str) -> None:
        if len(self._untaken) >= _UNTAKEN_KEPT:
            del self._untaken[next(iter(self._untaken))]  # the oldest
        self._untaken[message_id] = self._untaken.get(message_id, 0) + 1

    async def _leave(self, topic: str, group: str, member: str) -> None:
        await self._leave_member(member)

    async def _leave_member(self, name: str) -> None:
        m = self._members.pop(name, None)
        if m is None:
            return
        m.left = True
        m.changed.set()
        if m.heartbeat is not None:
            m.heartbeat.cancel()
            await asyncio.gather(m.heartbeat, return_exceptions=True)
        if m.receiving is not None:  # what it brings goes back too
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.wait_time + self.connect_timeout + 5):
                    await asyncio.shield(m.receiving)
        entries, m.entries = m.entries, []
        for entry in entries:
            if not entry.holder:
                self._count_untaken(entry.message_id)
        if entries:  # visible again now, not after the visibility timeout
            await self._set_visibility(m.queue_url, entries, 0)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        url = await self._queue(dead.topic, dead.group)
        message = dead.message
        body = message.structured()
        await self._call(
            "sqs",
            "send_message",
            f"replay {dead.id}",
            QueueUrl=url,
            MessageBody=body.decode(),
            MessageGroupId=self._replay_group(message),
            MessageDeduplicationId=f"replay-{dead.id}"[:128],
            MessageAttributes=_attributes(message),
        )

    def _replay_group(self, message: Message) -> str:
        return _group_id(message)

    async def _store_dead_letter(self, dead: DeadLetter) -> None:
        body = json.dumps(dead.to_dict(), ensure_ascii=False).encode()
        key = f"{self.prefix}/{dead.topic}/{dead.id}.json"
        what = f"store dead letter {dead.id}"
        if not self._bucket_ready:
            await self._ensure_bucket(what)
        await self._call("s3", "put_object", what, Bucket=self.bucket, Key=key, Body=body)

    async def _ensure_bucket(self, what: str) -> None:
        request: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            request["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._clients["s3"].create_bucket(**request)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
        except _FAILURES as exc:
            raise SQSBrokerError(f"cannot {what}: {_describe(exc)}") from exc
        self._bucket_ready = True

    async def dead_letters(self, topic: str | None = None) -> list[DeadLetter]:
        """Every dead letter (of one topic), oldest first; what SQS redrove is adopted first."""
        self._check_open()
        await self._adopt_redriven(topic)
        found = [await self._read_record(key) for key in await self._record_keys(topic)]
        found.sort(key=lambda dead: (dead.failed_at, dead.id))
        return found

    async def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; `LookupError` naming it when there is none."""
        self._check_open()
        if isinstance(dead_letter_id, str) and _DEAD_ID.match(dead_letter_id):
            for key in await self._record_keys(None):
                if key.endswith(f"/{dead_letter_id}.json"):
                    return await self._read_record(key)
        raise DeadLetterNotFound(dead_letter_id)

    async def _dead_letters(self) -> list[DeadLetter]:
        return await self.dead_letters()

    async def _drop_dead_letter(self, dead_letter_id: str) -> None:
        for key in await self._record_keys(None):
            if key.endswith(f"/{dead_letter_id}.json"):
                await self._call(
                    "s3", "delete_object", f"drop {dead_letter_id}", Bucket=self.bucket, Key=key
                )

    async def _record_keys(self, topic: str | None) -> list[str]:
        """The S3 keys of the records (of one topic)."""
        prefix = f"{self.prefix}/" if topic is None else f"{self.prefix}/{topic}/"
        keys: list[str] = []
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            try:
                reply = await self._clients["s3"].list_objects_v2(**request)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) == "NoSuchBucket":
                    return []  # no dead letter yet
                raise SQSBrokerError(f"cannot list the dead letters: {_describe(exc)}") from exc
            except _FAILURES as exc:
                raise SQSBrokerError(f"cannot list the dead letters: {_describe(exc)}") from exc
            keys += [item["Key"] for item in reply.get("Contents", [])]
            if not reply.get("IsTruncated"):
                return keys
            request["ContinuationToken"] = reply["NextContinuationToken"]

    async def _read_record(self, key: str) -> DeadLetter:
        reply = await self._call(
            "s3", "get_object", "read a dead letter", Bucket=self.bucket, Key=key
        )
        async with reply["Body"] as stream:
            raw = await stream.read()
        return DeadLetter.from_dict(json.loads(raw))

    async def _adopt_redriven(self, topic: str | None) -> None:
        """Turn what SQS moved to the groups' dead-letter queues into records."""
        stem = f"{self.prefix}-dlq-" + ("" if topic is None else _digest(topic)[:8])
        reply = await self._call(
            "sqs", "list_queues", "list dead-letter queues", QueueNamePrefix=stem
        )
        for url in reply.get("QueueUrls", []):
            await self._adopt_from(url)

    async def _adopt_from(self, url: str) -> None:
        reply = await self._call(
            "sqs",
            "receive_message",
            "read a dead-letter queue",
            QueueUrl=url,
            MaxNumberOfMessages=_BATCH,
            WaitTimeSeconds=0,
            AttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=[_KEY_ATTRIBUTE],
        )
        raws = reply.get("Messages", [])
        if not raws:
            return
        tags = (await self._call("sqs", "list_queue_tags", "read queue tags", QueueUrl=url)).get(
            "Tags", {}
        )
        topic, group = tags.get("tidings:topic"), tags.get("tidings:group")
        if topic is None or group is None:
            log.warning("dead-letter queue %s has no tidings tags; left alone", url)
            return
        for raw in raws:
            dead = DeadLetter(
                str(raw["MessageId"]),
                topic,
                group,
                f"SQS moved it to its dead-letter queue after {self.max_receives} receives "
                "without an ack (a consumer crashed or gave it back each time)",
                self.max_receives,
                datetime.now(UTC),
                self._decode(topic, raw),
            )
            await self._store_dead_letter(dead)
            await self._call(
                "sqs",
                "delete_message",
                "delete from a dead-letter queue",
                QueueUrl=url,
                ReceiptHandle=raw["ReceiptHandle"],
            )


class EventBridgeBroker(SQSBroker):
    """A broker on an EventBridge bus with a rule per group targeting an SQS FIFO queue;
    see the module docstring. Options: those of `SQSBroker`, plus `bus` (the prefix)."""

    scheme = "eventbridge"

    def __init__(
        self, url: str = "eventbridge://", *, bus: str | None = None, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.bus = self.prefix if bus is None else bus
        if not _BUS.match(self.bus):
            raise ConfigurationError(f"bus {self.bus!r}: use 1-256 letters, digits, '.', '_', '-'")

    @classmethod
    def _extra_options(cls) -> dict[str, type]:
        return {"bus": str}

    def _services(self) -> tuple[str, ...]:
        return ("sts", "sqs", "events", "s3")

    async def _prepare(self) -> None:
        if self.bus == "default":
            return
        try:
            await self._clients["events"].create_event_bus(Name=self.bus)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "ResourceAlreadyExistsException":
                raise SQSBrokerError(f"cannot create the bus {self.bus}: {_describe(exc)}") from exc
        except _FAILURES as exc:
            raise SQSBrokerError(f"cannot create the bus {self.bus}: {_describe(exc)}") from exc

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, topic: str, messages: list[Message]) -> None:
        for batch in _batches([self._tagged(topic, m) for m in messages]):
            entries = [
                {
                    "Source": str(message.attributes.get("source") or self.source),
                    "DetailType": message.type or "unknown",
                    "Detail": body.decode(),
                    "EventBusName": self.bus,
                }
                for message, body in batch
            ]
            for attempt in range(1, self.publish_attempts + 1):
                reply = await self._call(
                    "events", "put_events", f"publish to {topic!r}", Entries=entries
                )
                results = reply.get("Entries", [])
                failed = [e for e, r in zip(entries, results, strict=False) if r.get("ErrorCode")]
                if not reply.get("FailedEntryCount") or not failed:
                    break
                if attempt == self.publish_attempts:
                    codes = sorted({str(r.get("ErrorCode")) for r in results if r.get("ErrorCode")})
                    raise SQSBrokerError(
                        f"EventBridge refused {len(failed)} events for {topic!r}: "
                        + ", ".join(codes)
                    )
                entries = failed  # only those again (EventBridge promises no order anyway)
                await asyncio.sleep(0.1 * attempt)

    def _tagged(self, topic: str, message: Message) -> Message:
        """The message with the topic (and key) inside the CloudEvent, for rules to match."""
        attributes = dict(message.attributes)
        attributes[_TOPIC_ATTRIBUTE] = topic
        if message.key is not None:
            attributes.setdefault("partitionkey", message.key)
        return Message(
            topic, attributes, message.data, message.key, data_is_json=message.data_is_json
        )

    # -- groups and members ----------------------------------------------------------------

    def _replay_group(self, message: Message) -> str:
        return _TARGET_GROUP  # the queue's one message group, as the rule's target sends

    def _rule_name(self, topic: str, group: str) -> str:
        stem = f"{self.prefix}-{_digest(topic, group)}-"
        return stem + _readable(f"{topic}-{group}", 64 - len(stem))

    async def _route_source(self, topic: str, group: str) -> tuple[str, str]:
        name = self._rule_name(topic, group)
        bus = "" if self.bus == "default" else f"{self.bus}/"
        return (
            "events.amazonaws.com",
            f"arn:{self._partition}:events:{self.region}:{self._account}:rule/{bus}{name}",
        )

    async def _route(self, topic: str, group: str, queue_arn: str) -> None:
        """A rule matching the topic, targeting the group's queue."""
        name = self._rule_name(topic, group)
        what = f"route {topic!r} to group {group!r}"
        await self._call(
            "events",
            "put_rule",
            what,
            Name=name,
            EventBusName=self.bus,
            EventPattern=json.dumps({"detail": {_TOPIC_ATTRIBUTE: [topic]}}),
            State="ENABLED",
            Description=f"tidings group {group} on topic {topic}"[:512],
        )
        reply = await self._call(
            "events",
            "put_targets",
            what,
            Rule=name,
            EventBusName=self.bus,
            Targets=[
                {
                    "Id": "tidings",
                    "Arn": queue_arn,
                    "InputPath": "$.detail",
                    "SqsParameters": {"MessageGroupId": _TARGET_GROUP},
                }
            ],
        )
        if reply.get("FailedEntryCount"):
            raise SQSBrokerError(f"cannot {what}: {reply.get('FailedEntries')}")


# -- helpers ------------------------------------------------------------------------------


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _readable(name: str, size: int) -> str:
    """`name` as AWS names allow it (letters, digits, `-`, `_`), at most `size` long."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[: max(0, size)]


def _group_id(message: Message) -> str:
    """The FIFO message group: the key (hashed if SQS would refuse it), else one of its own."""
    key = message.key
    if key is None:
        return f"id-{message.id}" if _GROUP_ID.match(f"id-{message.id}") else str(uuid.uuid4())
    return key if _GROUP_ID.match(key) else f"key-{hashlib.sha256(key.encode()).hexdigest()}"


def _dedup_id(message: Message, body: bytes) -> str:
    ident = message.id
    if ident and _GROUP_ID.match(ident):
        return ident
    return hashlib.sha256(body).hexdigest()


def _attributes(message: Message) -> dict[str, Any]:
    """The key as a message attribute (SNS passes it on to SQS), for a key the CloudEvent
    does not carry."""
    if not message.key:
        return {}
    return {_KEY_ATTRIBUTE: {"DataType": "String", "StringValue": message.key}}


def _batches(messages: list[Message]) -> list[list[tuple[Message, bytes]]]:
    """The messages with their structured bodies, in order, in batches AWS accepts."""
    batches: list[list[tuple[Message, bytes]]] = []
    size = 0
    for message in messages:
        body = message.structured()
        if not batches or len(batches[-1]) == _BATCH or size + len(body) > _BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((message, body))
        size += len(body)
    return batches


def _policy(queue_arn: str, service: str, source_arn: str) -> dict[str, Any]:
    """A queue policy letting the topic (or rule) send to the queue."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "tidings-route",
                "Effect": "Allow",
                "Principal": {"Service": service},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": source_arn}},
            }
        ],
    }


def _refused(reply: dict[str, Any], what: str) -> None:
    failed = reply.get("Failed") or []
    if failed:
        reasons = sorted({f"{f.get('Code')}: {f.get('Message')}" for f in failed})
        raise SQSBrokerError(f"{what}: {'; '.join(reasons)}")


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code')}: {error.get('Message')}"
    return str(exc) or type(exc).__name__
