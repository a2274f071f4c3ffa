"""CloudEvents 1.0: the structured-mode JSON form of a recorded event, and back.

The attributes: `id` (the event id), `source`, `type`, `specversion`, `time`, `subject` (the
stream id), `datacontenttype`, `data`, and the extensions `streamversion`, `position`,
`schemaversion`, `correlationid`, `causationid`. Metadata headers whose names are valid
CloudEvents attribute names (such as `traceparent`) travel as extensions; any other header
travels in the `tidingsheaders` extension as a JSON object, so nothing is lost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tidings.core.codec import JSONCodec
from tidings.core.errors import InvalidCloudEvent
from tidings.core.events import UnknownEvent
from tidings.core.metadata import Metadata
from tidings.core.recorded import RecordedEvent

__all__ = ["cloudevent_attributes", "from_cloudevent", "to_cloudevent"]

SPEC_VERSION = "1.0"
_CORE = {
    "id",
    "source",
    "specversion",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "data_base64",
}
_OURS = {
    "streamversion",
    "position",
    "schemaversion",
    "correlationid",
    "causationid",
    "tidingsheaders",
}
_KNOWN = _CORE | _OURS
_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_default_codec = JSONCodec()


def to_cloudevent(record: RecordedEvent[Any], *, source: str = "tidings") -> dict[str, Any]:
    """The CloudEvents 1.0 structured-mode dict of `record` (`json.dumps` it to send)."""
    event = record.event
    ce = cloudevent_attributes(record, source=source)
    ce["data"] = event.data if isinstance(event, UnknownEvent) else event.model_dump(mode="json")
    return ce


def cloudevent_attributes(record: RecordedEvent[Any], *, source: str = "tidings") -> dict[str, Any]:
    """`to_cloudevent` without `data`: for senders that encode the data themselves."""
    ce: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": str(record.id),
        "source": source,
        "type": record.type,
        "subject": record.stream_id,
        "time": _utc_text(record.recorded_at),
        "datacontenttype": "application/json",
        "schemaversion": record.schema_version,
        "streamversion": record.version,
        "position": record.position,
    }
    if record.metadata:
        _add_metadata(ce, record.metadata)
    return ce


def event_attributes(
    id: str,
    type: str,
    subject: str,
    time: datetime,
    schema_version: int,
    metadata: Metadata,
    source: str,
) -> dict[str, Any]:
    """The attributes of an event not (yet) in a store: no stream version or position. A
    publisher builds these per message, so it is kept to one dict and no intermediate."""
    ce: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": id,
        "source": source,
        "type": type,
        "subject": subject,
        "time": _utc_text(time),
        "datacontenttype": "application/json",
        "schemaversion": schema_version,
    }
    if metadata:
        _add_metadata(ce, metadata)
    return ce


def _utc_text(time: datetime) -> str:
    if time.tzinfo is not UTC:
        time = time.astimezone(UTC)
    return time.isoformat().replace("+00:00", "Z")


def _add_metadata(ce: dict[str, Any], meta: Metadata) -> None:
    if meta.correlation_id is not None:
        ce["correlationid"] = meta.correlation_id
    if meta.causation_id is not None:
        ce["causationid"] = meta.causation_id
    if meta.headers:
        other: dict[str, str] = {}
        for key, value in meta.headers.items():
            if _NAME.match(key) and key not in _CORE and key not in _OURS:
                ce[key] = value
            else:
                other[key] = value
        if other:
            ce["tidingsheaders"] = json.dumps(other, ensure_ascii=False, sort_keys=True)


def from_cloudevent(ce: Mapping[str, Any], *, codec: JSONCodec | None = None) -> RecordedEvent[Any]:
    """Decode a structured-mode CloudEvent into a `RecordedEvent`.

    Events from other producers need no tidings extensions: the stream defaults to `subject`
    (or the `source`), versions and positions to 0, the schema version to 1.
    """
    codec = codec or _default_codec
    try:
        if ce.get("specversion") != SPEC_VERSION:
            raise ValueError(f"specversion must be {SPEC_VERSION!r}, got {ce.get('specversion')!r}")
        missing = [k for k in ("id", "source", "type") if not ce.get(k)]
        if missing:
            raise ValueError(f"missing required attribute(s): {', '.join(missing)}")
        data = ce.get("data")
        if data is None and "data_base64" in ce:
            raise ValueError("binary data (data_base64) is not a JSON event")
        raw = (
            data if isinstance(data, (str, bytes)) else json.dumps(data if data is not None else {})
        )
        try:
            event_id = UUID(str(ce["id"]))
        except ValueError:
            raise ValueError(f"id {ce['id']!r} is not a UUID") from None
        time = ce.get("time")
        recorded_at = datetime.fromisoformat(time) if time else datetime.now(UTC)  # "Z" too
        if recorded_at.tzinfo is None:
            recorded_at = recorded_at.replace(tzinfo=UTC)
        headers = {k: str(v) for k, v in ce.items() if k not in _KNOWN}
        if "tidingsheaders" in ce:
            headers.update(json.loads(ce["tidingsheaders"]))
        meta = Metadata(ce.get("correlationid"), ce.get("causationid"), headers)
        stream_id = str(ce.get("subject") or ce["source"])
        schema_version = int(ce.get("schemaversion", 1))
        position = int(ce.get("position", 0))
        version = int(ce.get("streamversion", 0))
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
        raise InvalidCloudEvent(str(exc)) from exc  # Overflow: 1e999; Recursion: [[[[…
    return codec.build(
        position,
        event_id,
        stream_id,
        version,
        str(ce["type"]),
        schema_version,
        recorded_at,
        raw,
        meta,
    )
