"""Messages as stream entries and back, without I/O: a message is a CloudEvent in structured
mode (field `ce`, its key in `k`, a replay's group in `g`), and entry ids in stream order."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tidings.brokers.envelope import Message

_ANY = -1  # the stream of keyless messages, which all members of a group share


def _message(topic: str, fields: Mapping[bytes, bytes]) -> Message:
    raw_key = fields.get(b"k")
    key = _text(raw_key) if raw_key is not None else None  # another producer's bytes
    if b"ce" not in fields:  # another producer's entry: keep all of it for the dead letter
        kept = {_text(name): _text(value) for name, value in fields.items()}
        return Message(topic, {}, json.dumps(kept).encode(), key, kept)
    body = fields[b"ce"]
    try:
        return Message.from_structured(topic, body, key=key)
    except ValueError:
        return Message(topic, {}, body, key)  # decoding it reports InvalidCloudEvent


def _order(entry_id: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in entry_id.split(b"-"))


def _fields(message: Message) -> dict[Any, Any]:
    fields: dict[Any, Any] = {"ce": message.structured()}
    if message.key is not None:
        fields["k"] = message.key
    return fields


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
