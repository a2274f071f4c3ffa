"""`SQSBroker`: the URL and options, the clients, publishing, groups and dead letters."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions  # type: ignore[import-untyped]
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]

from tidings.brokers.base import (
    BrokerBase,
    DeadLetter,
    DeadLetterNotFound,
    Received,
    option_types,
)
from tidings.brokers.envelope import Message
from tidings.brokers.sqs.errors import _FAILURES, SQSBrokerError, _code, _describe, _refused
from tidings.brokers.sqs.member import _MAX_VISIBILITY, _Member, _receive
from tidings.brokers.sqs.records import (
    _BATCH,
    _KEY_ATTRIBUTE,
    _attributes,
    _batches,
    _decode,
    _dedup_id,
    _group_id,
)
from tidings.brokers.sqs.topology import _digest, _ensure_bucket, _queue, _topic
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.store.base import url_options

log = logging.getLogger("tidings.brokers.sqs")

_PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DEAD_ID = re.compile(r"^[A-Za-z0-9-]{1,100}$")


class SQSBroker(BrokerBase):
    """A broker on SNS FIFO topics and SQS FIFO queues; see docs/brokers.md.

    Options (keyword or URL query): `endpoint_url`, `region`, `prefix` of every name
    (`tidings`; 1-24 lowercase letters, digits, `-`), `visibility_timeout` seconds before a
    crashed member's messages come back (30), `wait_time` of a long poll (20; 0 polls every
    `poll_interval`, 0.2 s), `max_receives` before SQS redrives a message (10), dead-letter
    `bucket`, `connect_timeout` (5 s), `publish_attempts` (3, botocore's retries),
    `access_key_id` with `secret_access_key`, `profile`.
    """

    scheme = "sqs"
    _decode = staticmethod(_decode)  # the decoder, as the other adapters have it

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
        return cls(url, **(url_options(url, option_types(cls)) | options))

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
        await self._leave_all()
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
        arn = await _topic(self, topic)
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

    # -- groups and members ----------------------------------------------------------------

    async def _declare(self, topic: str, group: str) -> None:
        await _queue(self, topic, group)

    async def _route_source(self, topic: str, group: str) -> tuple[str, str]:
        """The service that sends to the group's queue and the ARN it sends from."""
        return "sns.amazonaws.com", await _topic(self, topic)

    async def _route(self, topic: str, group: str, queue_arn: str) -> None:
        """Deliver the topic's messages to the group's queue: an SNS subscription."""
        await self._call(
            "sns",
            "subscribe",
            f"subscribe group {group!r} to {topic!r}",
            TopicArn=await _topic(self, topic),
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
            ReturnSubscriptionArn=True,
        )

    def _receive(
        self, topic: str, group: str, member: str, prefetch: int
    ) -> AsyncIterator[Received]:
        return _receive(self, topic, group, member, prefetch)

    # -- dead letters ----------------------------------------------------------------------

    async def _redeliver(self, dead: DeadLetter) -> None:
        url = await _queue(self, dead.topic, dead.group)
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
            await _ensure_bucket(self, what)
        await self._call("s3", "put_object", what, Bucket=self.bucket, Key=key, Body=body)

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
                _decode(topic, raw),
            )
            await self._store_dead_letter(dead)
            await self._call(
                "sqs",
                "delete_message",
                "delete from a dead-letter queue",
                QueueUrl=url,
                ReceiptHandle=raw["ReceiptHandle"],
            )
