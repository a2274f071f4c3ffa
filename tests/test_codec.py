"""The JSON codec and the CloudEvents mapping, checked with generated data."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field

from tests.events import Deposited, Note
from tidings import (
    Event,
    InvalidCloudEvent,
    JSONCodec,
    Metadata,
    NotAnEvent,
    RecordedEvent,
    TypeRegistry,
    UnknownEvent,
    UnknownEventType,
    from_cloudevent,
    to_cloudevent,
    uuid7,
)

REGISTRY = TypeRegistry()


class Rich(Event, type="test.codec.rich", version=3, registry=REGISTRY):
    text: str
    number: float
    items: list[int]
    when: datetime
    extra: dict[str, str] = Field(default_factory=dict)


CODEC = JSONCodec(REGISTRY)
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
rich_events = st.builds(
    Rich,
    text=texts,
    number=st.floats(allow_nan=False, allow_infinity=False),
    items=st.lists(st.integers(min_value=-(2**53), max_value=2**53), max_size=5),
    when=st.datetimes(timezones=st.just(UTC)),
    extra=st.dictionaries(texts, texts, max_size=3),
)
metadatas = st.builds(
    Metadata,
    correlation_id=st.none() | texts,
    causation_id=st.none() | texts,
    headers=st.dictionaries(texts, texts, max_size=4),
)


def record(event: Event, meta: Metadata, position: int = 7) -> RecordedEvent[Any]:
    encoded = CODEC.encode(event)
    return CODEC.decode(
        position,
        encoded.id,
        "stream-1",
        3,
        encoded.type,
        encoded.schema_version,
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        encoded.data,
        CODEC.encode_metadata(meta),
    )


@given(rich_events, metadatas)
def test_encode_decode_round_trip(event: Rich, meta: Metadata) -> None:
    recorded = record(event, meta)
    assert recorded.event == event
    assert recorded.id == event.event_id
    assert recorded.metadata == meta
    assert recorded.schema_version == 3 and recorded.type == "test.codec.rich"


@given(rich_events, metadatas)
def test_cloudevent_round_trip_and_sdk_agrees(event: Rich, meta: Metadata) -> None:
    recorded = record(event, meta)
    ce = to_cloudevent(recorded, source="/orders")
    wire = json.dumps(ce)
    back = from_cloudevent(json.loads(wire), codec=CODEC)
    assert back == recorded
    sdk = JSONFormat().read(None, wire)  # the CloudEvents SDK validates it as a 1.0 event
    assert sdk.get_id() == str(recorded.id) and sdk.get_type() == "test.codec.rich"
    assert sdk.get_specversion() == "1.0" and sdk.get_subject() == "stream-1"
    assert sdk.get_extension("position") == 7 and sdk.get_data() == ce["data"]


def test_cloudevent_attributes() -> None:
    meta = Metadata("corr-1", "cause-1", {"traceparent": "00-abc-def-01", "X-Tenant": "acme"})
    ce = to_cloudevent(_note_record(meta))
    assert ce["specversion"] == "1.0"
    assert ce["datacontenttype"] == "application/json"
    assert ce["data"] == {"text": "hi"}
    assert ce["time"] == "2026-01-02T03:04:05.678901Z"
    assert (ce["streamversion"], ce["position"], ce["schemaversion"]) == (3, 7, 1)
    assert (ce["correlationid"], ce["causationid"]) == ("corr-1", "cause-1")
    assert ce["traceparent"] == "00-abc-def-01"  # a valid attribute name travels as itself
    assert json.loads(ce["tidingsheaders"]) == {"X-Tenant": "acme"}  # others are kept too


def _note_record(meta: Metadata) -> RecordedEvent[Any]:
    codec = JSONCodec()
    note = Note(text="hi")
    encoded = codec.encode(note)
    return codec.decode(
        7,
        encoded.id,
        "stream-1",
        3,
        encoded.type,
        1,
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        encoded.data,
        codec.encode_metadata(meta),
    )


def test_cloudevent_from_a_plain_producer() -> None:
    sdk_event = CloudEvent(
        {
            "type": "test.account.deposited",
            "source": "https://bank.example/accounts",
            "id": str(uuid7()),
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"amount": 12},
    )
    recorded = from_cloudevent(json.loads(JSONFormat().write(sdk_event)))
    assert recorded.event == Deposited(amount=12)
    assert recorded.stream_id == "https://bank.example/accounts"


@pytest.mark.parametrize(
    "bad",
    [
        {"specversion": "0.3", "id": str(uuid7()), "source": "s", "type": "t"},
        {"specversion": "1.0", "source": "s", "type": "t"},
        {"specversion": "1.0", "id": "not-a-uuid", "source": "s", "type": "t"},
    ],
)
def test_invalid_cloudevents_are_named(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidCloudEvent):
        from_cloudevent(bad)


def test_encode_refuses_non_events() -> None:
    with pytest.raises(NotAnEvent):
        CODEC.encode({"amount": 1})  # type: ignore[arg-type]


def test_unknown_types_raise_or_are_kept_raw() -> None:
    with pytest.raises(UnknownEventType) as info:
        JSONCodec(TypeRegistry()).decode_event("test.codec.rich", 3, '{"a": 1}')
    assert (info.value.type, info.value.version) == ("test.codec.rich", 3)
    raw = JSONCodec(TypeRegistry(), keep_unknown=True).decode_event("x.y", 2, '{"a": 1}')
    assert raw == UnknownEvent(type="x.y", version=2, data={"a": 1})
    encoded = CODEC.encode(raw)  # raw events can be stored again unchanged
    assert (encoded.type, encoded.schema_version, json.loads(encoded.data)) == ("x.y", 2, {"a": 1})
