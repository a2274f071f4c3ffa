"""Messages as SQS, SNS and EventBridge bodies and back (no I/O)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

from tidings.brokers.envelope import Message
from tidings.core.errors import InvalidCloudEvent

_KEY_ATTRIBUTE = "tidings-key"
_TOPIC_ATTRIBUTE = "tidingstopic"  # EventBridge: the CloudEvent extension rules match on
_GROUP_ID = re.compile(r"^[A-Za-z0-9!-/:-@\[-`{-~]{1,128}$")  # what SQS takes as a group id
_BATCH = 10  # entries in one SNS, SQS or EventBridge batch call
_BATCH_BYTES = 240_000  # below the 256 KiB a batch call may carry


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


def _decode(topic: str, raw: dict[str, Any]) -> Message:
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
