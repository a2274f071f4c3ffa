"""`DeadLetter`: a message a group gave up on, as every broker keeps and shows it."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tidings.brokers.envelope import Message
from tidings.core.errors import TidingsError

__all__ = ["DeadLetter", "DeadLetterNotFound"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on: why, after how many attempts, and the original."""

    id: str
    topic: str
    group: str
    error: str
    attempts: int
    failed_at: datetime
    message: Message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form: what the CLI prints and what adapters store (`from_dict` reads
        it back). Data that is not UTF-8 is kept as `data_base64`."""
        record: dict[str, Any] = {
            "id": self.id,
            "topic": self.topic,
            "group": self.group,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat(),
            "key": self.message.key,
            "attributes": dict(self.message.attributes),
            "headers": dict(self.message.headers),
        }
        try:
            record["data"] = self.message.data.decode("utf-8")
        except UnicodeDecodeError:
            record["data_base64"] = base64.b64encode(self.message.data).decode("ascii")
        return record

    def to_json(self, limit: int | None = None, *, limit_name: str = "the limit") -> bytes:
        """`to_dict` as UTF-8 JSON, within `limit` bytes when given (a broker's largest
        record). A message too large to keep whole (one just under the limit grows as JSON)
        is kept cut: its data, error, attribute and header values shortened until the record
        fits, and the error says so. It is still dead-lettered, instead of failing its
        consumer over and over."""
        body = json.dumps(self.to_dict(), ensure_ascii=False, default=str).encode()
        if limit is None:
            return body
        size, room, count = len(body), limit // 8, 64
        note = f" [cut from {size:,} bytes to fit {limit_name} of {limit:,}]"
        while len(body) > limit and room:
            message = self.message
            smaller = DeadLetter(
                self.id,
                self.topic,
                self.group,
                self.error[:room] + note,
                self.attempts,
                self.failed_at,
                Message(
                    message.topic,
                    _cut(message.attributes, room, count),
                    message.data[:room],
                    message.key and message.key[:room],
                    _cut(message.headers, room, count),
                ),
            )
            body = json.dumps(smaller.to_dict(), ensure_ascii=False, default=str).encode()
            room, count = room // 2, count // 2
        return body

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> DeadLetter:
        """The dead letter `to_dict` described."""
        if "data_base64" in record:
            data = base64.b64decode(record["data_base64"])
        else:
            data = str(record.get("data", "")).encode()
        message = Message(
            record["topic"],
            dict(record.get("attributes") or {}),
            data,
            record.get("key"),
            dict(record.get("headers") or {}),
        )
        return cls(
            str(record["id"]),
            record["topic"],
            record["group"],
            str(record["error"]),
            int(record["attempts"]),
            datetime.fromisoformat(record["failed_at"]),
            message,
        )


def _cut(values: Mapping[str, Any], room: int, count: int) -> dict[str, Any]:
    """The first `count` entries, names cut to 64 characters and text values to `room`."""
    return {
        str(k)[:64]: v[:room] if isinstance(v, str) else v for k, v in list(values.items())[:count]
    }


class DeadLetterNotFound(TidingsError, LookupError):
    """No dead letter has that id."""

    def __init__(self, dead_letter_id: str) -> None:
        self.dead_letter_id = dead_letter_id
        super().__init__(f"no dead letter {dead_letter_id!r}")
