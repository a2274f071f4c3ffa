"""Records and the values of tidings' own Kafka topics, without I/O: a message as a Kafka
record (the CloudEvents Kafka binding, binary mode) and back, the dead-letter records, and
the handed-over delivery counts."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from aiokafka import (  # type: ignore[import-untyped]
    TopicPartition,
)

from tidings.brokers.base import DeadLetter
from tidings.brokers.envelope import Message
from tidings.core.errors import InvalidCloudEvent

log = logging.getLogger(__name__)

_REPLAY_HEADER = "tidings-replay-group"
_ATTEMPTS = "tidings-attempts:"
_DEAD_LETTER_MAX = 1_000_000  # bytes: under the default 1 MiB record limit (`message.max.bytes`,
# the producer's `max_request_size`), with room for the key, headers and batch framing
_COUNTS_MAX = 16_000  # characters of one partition's handed-over counts (_BUFFER fit easily)


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


def _attempts_key(group_id: str, tp: TopicPartition) -> str:
    """The key of a partition's handed-over counts (group ids never contain `|`)."""
    return f"{group_id}|{tp.topic}|{tp.partition}"
