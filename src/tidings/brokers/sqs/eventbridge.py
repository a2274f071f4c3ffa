"""`EventBridgeBroker`: an SQSBroker that publishes to an EventBridge bus, with a rule per
group targeting the group's SQS FIFO queue."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import botocore.exceptions  # type: ignore[import-untyped]

from tidings.brokers.envelope import Message
from tidings.brokers.sqs.broker import SQSBroker
from tidings.brokers.sqs.errors import _FAILURES, SQSBrokerError, _code, _describe
from tidings.brokers.sqs.records import _TOPIC_ATTRIBUTE, _batches
from tidings.brokers.sqs.topology import _digest, _readable
from tidings.core.errors import ConfigurationError

_TARGET_GROUP = "tidings"  # EventBridge: the fixed message group id of every target
_BUS = re.compile(r"^[A-Za-z0-9._-]{1,256}$")


class EventBridgeBroker(SQSBroker):
    """A broker on an EventBridge bus with a rule per group targeting an SQS FIFO queue;
    see docs/brokers.md. Options: those of `SQSBroker`, plus `bus` (the prefix)."""

    scheme = "eventbridge"

    def __init__(
        self, url: str = "eventbridge://", *, bus: str | None = None, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.bus = self.prefix if bus is None else bus
        if not _BUS.match(self.bus):
            raise ConfigurationError(f"bus {self.bus!r}: use 1-256 letters, digits, '.', '_', '-'")

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
