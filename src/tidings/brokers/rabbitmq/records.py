"""Messages as AMQP messages (the CloudEvents AMQP binding, binary mode) and back, and the
dead-letter records (no I/O)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aio_pika.abc

from tidings.brokers.base import DeadLetter
from tidings.brokers.envelope import Message
from tidings.brokers.rabbitmq.errors import RabbitMQBrokerError
from tidings.core.errors import InvalidCloudEvent

_RECORD_HEADER = "x-tidings-dead-letter"
MAX_HEADERS_SIZE = 131_072 - 1_024
"""Bytes the AMQP headers table of one message may take: RabbitMQ's default `frame_max`
less room for the frame and the other properties (content type, message id, ...)."""


def to_amqp(message: Message, prefix: str) -> aio_pika.Message:
    """`message` as an AMQP message, its attributes as `prefix` headers; refused with a
    `RabbitMQBrokerError` if its headers do not fit in one frame."""
    headers: dict[str, Any] = dict(message.binary_headers(prefix))
    content_type = headers.pop("content-type")
    size = 4 + sum(6 + len(k.encode()) + len(str(v).encode()) for k, v in headers.items())
    if size > MAX_HEADERS_SIZE:  # the encoded AMQP table, exactly for text values
        raise RabbitMQBrokerError(
            f"message {message.id} to {message.topic!r}: its {len(headers):,} headers (the "
            f"event's metadata) encode to {size:,} bytes, over the {MAX_HEADERS_SIZE:,} "
            "one RabbitMQ frame carries (frame_max); send less metadata"
        )
    return aio_pika.Message(
        message.data,
        headers=headers,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.id or None,
    )


def from_amqp(topic: str, incoming: aio_pika.abc.AbstractIncomingMessage, prefix: str) -> Message:
    """The message in `incoming`; one that is no CloudEvent at all is kept as it came."""
    headers = _text_headers(incoming.headers or {}, prefix)
    if incoming.content_type:
        headers["content-type"] = incoming.content_type
    try:
        return Message.from_binary(topic, headers, incoming.body, prefix=prefix)
    except InvalidCloudEvent:  # no CloudEvent at all: let the consumer dead-letter it
        return Message(topic, {}, incoming.body, None, headers)


def dead_letter_record(dead: DeadLetter, max_age: float) -> aio_pika.Message:
    """`dead` as the JSON record kept in the dead-letter queue (expiring after `max_age`
    seconds; 0: never)."""
    return aio_pika.Message(
        json.dumps(dead.to_dict(), ensure_ascii=False, default=str).encode(),
        headers={_RECORD_HEADER: "1"},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=dead.id,
        expiration=max_age or None,
    )


def from_dead_letter_record(
    incoming: aio_pika.abc.AbstractIncomingMessage, prefix: str
) -> DeadLetter:
    """A dead letter as listed: one of our records, or a message RabbitMQ dead-lettered itself."""
    if (incoming.headers or {}).get(_RECORD_HEADER) is not None:
        return DeadLetter.from_dict(json.loads(incoming.body))
    # Dead-lettered by RabbitMQ itself: the message as it was, with the reason.
    headers = incoming.headers or {}
    queue = _text(headers.get("x-first-death-queue")) or ""
    parts = queue.split(":")
    topic, group = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
    message = from_amqp(topic, incoming, prefix)
    reason = _text(headers.get("x-first-death-reason")) or "rejected"
    counted = headers.get("x-delivery-count")
    stamp = incoming.timestamp
    dead_id = incoming.message_id or str(uuid.uuid5(uuid.NAMESPACE_OID, repr(incoming.body)))
    return DeadLetter(
        dead_id,
        topic,
        group,
        f"dead-lettered by RabbitMQ ({reason}) from {queue or 'a queue'}",
        (counted if isinstance(counted, int) else 0) + 1,
        stamp.astimezone(UTC) if isinstance(stamp, datetime) else datetime.now(UTC),
        message,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _text_headers(headers: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """AMQP headers as text. `cloudEvents:` names become `cloudEvents_`; a `time` that is
    an AMQP timestamp (or milliseconds, as the CloudEvents SDK sends it) becomes RFC 3339."""
    out: dict[str, str] = {}
    time_name = f"{prefix.lower()}time"
    for name, value in headers.items():
        if type(value) is str and name[11:12] != ":":  # nearly every header: as it is
            out[name] = value
            continue
        if name.lower().startswith("cloudevents:"):
            name = prefix + name[len("cloudevents:") :]
        if isinstance(value, datetime):
            aware = value if value.tzinfo else value.replace(tzinfo=UTC)
            out[name] = aware.isoformat()
        elif name.lower() == time_name and isinstance(value, int) and not isinstance(value, bool):
            try:
                out[name] = datetime.fromtimestamp(value / 1000, UTC).isoformat()
            except (OverflowError, ValueError, OSError):  # no time: decoding refuses it
                out[name] = str(value)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[name] = str(value)
        elif isinstance(value, bytes):
            out[name] = value.decode("utf-8", "replace")
    return out
