"""Messages on the wire: CloudEvents 1.0 in binary mode (attributes as headers, data as the
body) for brokers with headers, structured mode (one JSON document) for those without.

A `Message` is the broker-neutral form both modes are made from. Adapters pick the mode
and the header prefix their broker's CloudEvents binding uses (`ce-` for HTTP-style
headers, `ce_` for Kafka, `cloudEvents_` for AMQP 0-9-1 properties).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from pydantic_core import to_json

from tidings.core.cloudevents import cloudevent_attributes, event_attributes, from_cloudevent
from tidings.core.codec import JSONCodec
from tidings.core.errors import InvalidCloudEvent
from tidings.core.events import Event
from tidings.core.metadata import EMPTY, Metadata
from tidings.core.recorded import RecordedEvent

__all__ = ["Message", "encode"]

_INTS = ("schemaversion", "streamversion", "position")
_PERCENT_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
"""What the HTTP binding (and so `ce-` headers) leaves unescaped: printable ASCII but `"`
and `%`; the rest is UTF-8, percent-encoded."""
_NEEDS_ESCAPE = re.compile(r'[^\x21-\x7e]|["%]')


@dataclass(frozen=True, slots=True)
class Message:
    """One event as a broker carries it: CloudEvents attributes, JSON data, and a key."""

    topic: str
    attributes: Mapping[str, Any]
    data: bytes
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # broker headers, as received
    data_is_json: bool = field(default=False, compare=False)  # `data` is JSON tidings wrote

    @property
    def id(self) -> str:
        """The CloudEvent id: the event's id, so a re-publish is recognisably the same."""
        return str(self.attributes.get("id", ""))

    @property
    def type(self) -> str:
        return str(self.attributes.get("type", ""))

    # -- binary mode ------------------------------------------------------------------------

    def binary_headers(self, prefix: str = "ce-") -> dict[str, str]:
        """The attributes as broker headers (`ce-id`, `ce-type`, ...) plus `content-type`.

        `ce-` headers are percent-encoded as the HTTP binding says (the SDKs do so)."""
        values = [str(value) for value in self.attributes.values()]
        if prefix == "ce-" and _NEEDS_ESCAPE.search("".join(values)):  # one look for all
            values = [_escape(value) for value in values]
        named = zip(self.attributes, values, strict=True)
        headers = {f"{prefix}{name}": value for name, value in named}
        headers.pop(f"{prefix}datacontenttype", None)
        headers["content-type"] = str(self.attributes.get("datacontenttype", "application/json"))
        return headers

    @classmethod
    def from_binary(
        cls,
        topic: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        prefix: str = "ce-",
        key: str | None = None,
    ) -> Message:
        """A message received in binary mode. Headers without the prefix are kept aside."""
        lower, size = prefix.lower(), len(prefix)
        escaped = lower == "ce-"
        attributes: dict[str, Any] = {}
        for name, value in headers.items():
            if name.startswith(prefix) or name[:size].lower() == lower:
                attr = name[size:].lower()
                if escaped and isinstance(value, str) and "%" in value:
                    value = unquote(value)
                attributes[attr] = _int_or_text(value) if attr in _INTS else value
        content_type = headers.get("content-type") or headers.get("Content-Type")
        if content_type:
            attributes["datacontenttype"] = content_type
        if "specversion" not in attributes and body.lstrip().startswith(b"{"):
            return cls.from_structured(topic, body, key=key, headers=headers)
        key = key or _key(attributes.get("partitionkey"))
        return cls(topic, attributes, body, key, dict(headers))

    # -- structured mode --------------------------------------------------------------------

    def structured(self) -> bytes:
        """The whole CloudEvent as one JSON document (for brokers without headers)."""
        # pydantic-core's JSON encoder (compact, UTF-8, keys in order): the same bytes as
        # `json.dumps(..., ensure_ascii=False, separators=(",", ":"))`, several times faster.
        if self.data_is_json and self.data:  # splice the encoded data in: no second parse
            head = to_json(self.attributes)
            comma = b"," if self.attributes else b""
            return b"".join((head[:-1], comma, b'"data":', self.data, b"}"))
        document = dict(self.attributes)
        try:
            document["data"] = json.loads(self.data)
        except (ValueError, RecursionError):  # not JSON, or nested too deep: as text
            document["data"] = self.data.decode("utf-8", "replace")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_structured(
        cls,
        topic: str,
        body: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Message:
        """A message received in structured mode; not a JSON object is `InvalidCloudEvent`."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InvalidCloudEvent(f"the message is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise InvalidCloudEvent("the message is not a JSON object")
        if "data_base64" in document:
            try:
                raw = base64.b64decode(document.pop("data_base64"), validate=True)
            except (ValueError, TypeError) as exc:
                raise InvalidCloudEvent(f"data_base64 is not base64: {exc}") from exc
        elif "data" not in document:
            raw = b""
        else:
            data = document.pop("data")
            raw = (
                data.encode() if isinstance(data, str) else to_json(data, inf_nan_mode="constants")
            )
        key = key or _key(document.get("partitionkey"))
        return cls(topic, document, raw, key, dict(headers or {}))

    # -- decoding ---------------------------------------------------------------------------

    def record(self, codec: JSONCodec | None = None) -> RecordedEvent[Any]:
        """The typed event with its metadata; `InvalidCloudEvent` or a decode error if bad."""
        document = dict(self.attributes)
        document.pop("partitionkey", None)  # the key travels beside the event, not in it
        document["data"] = self.data.decode("utf-8", "replace")
        return from_cloudevent(document, codec=codec)


def _int_or_text(value: Any) -> Any:
    """A header holding a whole number as an int; anything else (`"²"` is a digit to
    `str.isdigit`, not to `int`; more digits than `int` reads) stays as it came, for
    `from_cloudevent` to refuse."""
    text = str(value)
    if text.isascii() and text.isdigit() and len(text) <= 19:
        return int(text)
    return value


def _key(value: Any) -> str | None:
    """A `partitionkey` as the key a broker orders by: text, whatever JSON it came as."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _escape(value: Any) -> str:
    text = str(value)
    return quote(text, safe=_PERCENT_SAFE) if _NEEDS_ESCAPE.search(text) else text


def encode(
    topic: str,
    event: Event,
    *,
    key: str | None = None,
    metadata: Metadata | None = None,
    source: str = "tidings",
    record: RecordedEvent[Any] | None = None,
    codec: JSONCodec | None = None,
) -> Message:
    """The message for publishing `event` (or a stored `record` of it, keeping its stream,
    version and position) to `topic`."""
    codec = codec or JSONCodec()
    if record is None:  # a new event: not in a store, no stream version or position
        encoded = codec.encode(event)
        document = event_attributes(
            str(encoded.id),
            encoded.type,
            key or topic,
            datetime.now(UTC),
            encoded.schema_version,
            metadata or EMPTY,
            source,
        )
    else:
        encoded = codec.encode(record.event)
        document = cloudevent_attributes(record, source=source)
        if record.version == 0:  # not from a store: no stream version or position to carry
            del document["streamversion"], document["position"]
    if key is not None:
        document["partitionkey"] = key  # the CloudEvents partitioning extension
    return Message(topic, document, encoded.data.encode(), key, data_is_json=True)
