"""The JSON codec: events and metadata to stored text and back.

Every store and broker goes through one `JSONCodec`, so size limits, unknown types and (later)
upcasting behave the same everywhere. Data is the event's fields as a JSON object; metadata is
a JSON object, or nothing when empty.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from pydantic_core import from_json, to_json

from tidings.core.errors import EventDecodeError, NotAnEvent, UnknownEventType
from tidings.core.events import Event, TypeRegistry, UnknownEvent, default_registry
from tidings.core.metadata import EMPTY, Metadata
from tidings.core.personal import PREFIX, REDACTED, decrypt_fields, encrypt
from tidings.core.recorded import RecordedEvent
from tidings.core.upcasting import Upcaster

__all__ = ["EncodedEvent", "JSONCodec"]


class EncodedEvent(NamedTuple):
    """An event ready to store: its id, type, schema version and JSON data (a tuple: one is
    built per appended event)."""

    id: UUID
    type: str
    schema_version: int
    data: str
    size: int
    tags: tuple[str, ...] = ()


class JSONCodec:
    """Encodes events to JSON and decodes stored rows into `RecordedEvent`s.

    Args:
        registry: where (type, version) pairs find their classes.
        keep_unknown: decode unregistered types as `UnknownEvent` instead of raising.
    """

    def __init__(self, registry: TypeRegistry | None = None, *, keep_unknown: bool = False) -> None:
        self.registry = registry if registry is not None else default_registry
        self.keep_unknown = keep_unknown

    def encode(
        self, event: Event, index: int = 0, keys: Mapping[str, bytes] | None = None
    ) -> EncodedEvent:
        """Encode one event; `NotAnEvent` for anything that is not a storable `Event`.

        Personal fields are encrypted with their subject's key from `keys` (the store
        passes them), or redacted without `keys` (what a broker publishes)."""
        if isinstance(event, UnknownEvent):
            text = event.raw
            if text is None:
                text = json.dumps(event.data, ensure_ascii=False, separators=(",", ":"))
            size = len(text.encode())
            return EncodedEvent(event.event_id, event.type, event.version, text, size, event.tags)
        if not isinstance(event, Event) or event.__event_type__ is None:
            raise NotAnEvent(event, index)
        tags = tuple(dict.fromkeys(event.event_tags())) if event.__tagged__ else ()
        if event.__personal__:
            text = json.dumps(_sealed(event, keys), ensure_ascii=False, separators=(",", ":"))
            size = len(text.encode())
            return EncodedEvent(
                event.event_id, event.__event_type__, event.__event_version__, text, size, tags
            )
        raw = event.__pydantic_serializer__.to_json(event)
        return EncodedEvent(
            event.event_id,
            event.__event_type__,
            event.__event_version__,
            raw.decode(),
            len(raw),
            tags,
        )

    @staticmethod
    def encode_metadata(metadata: Metadata) -> str | None:
        """The stored form of `metadata`: None when it is empty."""
        if not metadata:
            return None
        return to_json(metadata.to_dict()).decode()  # compact UTF-8, as json.dumps would

    def decode_event(
        self, type: str, schema_version: int, data: str | bytes, metadata: Metadata = EMPTY
    ) -> Event:
        """Decode one event's data into its registered class (or `UnknownEvent`), upcast
        from an older version when upcasters say how."""
        validator = self._validator(type, schema_version)
        if validator.__class__ is _Upcasting:
            return validator.upcast(data, metadata)
        return validator.validate_json(data)  # type: ignore[no-any-return]

    def decode(
        self,
        position: int,
        id: UUID,
        stream_id: str,
        version: int,
        type: str,
        schema_version: int,
        recorded_at: datetime,
        data: str | bytes,
        metadata: str | Metadata | None,
        keys: Mapping[str, bytes] | None = None,
    ) -> RecordedEvent[Any]:
        """Build a `RecordedEvent` from one stored row; `EventDecodeError` names the row.

        `metadata` as stored (text or None) is parsed as `iter_rows` does; given parsed (a
        received message) only the data is validated. Personal values open with `keys`,
        else read `REDACTED`."""
        if not isinstance(metadata, Metadata):
            row = (position, id, stream_id, version, type, schema_version, recorded_at, data)
            return next(self.iter_rows([(*row, metadata)], keys=keys))
        event: Event
        try:
            validator = self._validator(type, schema_version)
            if validator.__class__ is _Upcasting or (self.registry.personal and _sealed_in(data)):
                event, type, schema_version = _decode_slowly(
                    validator, data, metadata, keys, type, schema_version, self._personal
                )
            else:
                event = validator.validate_json(data)
        except Exception as exc:
            raise EventDecodeError(stream_id, version, position, _reason(exc)) from exc
        _set_private(event, "__pydantic_private__", {"_id": id})  # see Event.event_id
        tags = tuple(dict.fromkeys(event.event_tags())) if event.__tagged__ else ()
        return _new_record(
            RecordedEvent,
            (
                id,
                stream_id,
                version,
                position,
                type,
                schema_version,
                recorded_at,
                event,
                metadata,
                tags,
            ),
        )

    build = decode  # `decode` for callers holding parsed `Metadata` (a received message)

    def iter_rows(
        self,
        rows: Iterable[Sequence[Any]],
        *,
        id_of: Callable[[Any], UUID] | None = None,
        time_of: Callable[[Any], datetime] | None = None,
        keys: Mapping[str, bytes] | None = None,
    ) -> Iterator[RecordedEvent[Any]]:
        """Decode stored rows `(position, id, stream_id, version, type, schema_version,
        recorded_at, data, metadata)` one at a time: the hot path of every read.

        Lazily, so a reader that drops each record before taking the next keeps only one
        decoded record alive, and the garbage collector never has to promote a whole batch.
        `id_of` and `time_of` convert a backend's stored id and time (bytes, integers) when
        they are not already a `UUID` and an aware `datetime`. `keys` open personal values
        (see `tidings.core.personal`); without a subject's key they read `REDACTED`.
        """
        validators: dict[tuple[str, int], Any] = {}
        # Events appended together share their time and metadata: decode each once per run.
        last_at: Any = None
        last_time: Any = None
        last_meta: str | None = None
        metadata = EMPTY
        event: Event
        personal = self.registry.personal  # no personal classes: no sealed values to look for
        for (
            position,
            raw_id,
            stream_id,
            version,
            type_,
            schema_version,
            at,
            data,
            meta,
            raw,
        ) in _with_tags(rows):
            tags = () if raw is None else _tags_of(raw)
            try:
                if stream_id.__class__ is not str or version.__class__ is not int:
                    raise ValueError("a stored stream id is text and its version a whole number")
                key = (type_, schema_version)
                validator = validators.get(key)
                if validator is None:
                    validator = validators[key] = self._validator(type_, schema_version)
                if meta != last_meta:
                    metadata = EMPTY if meta is None else Metadata.from_dict(json.loads(meta))
                    last_meta = meta
                if validator.__class__ is _Upcasting and not personal:  # an old version
                    event = validator.upcast(data, metadata)
                    type_, schema_version = validator.type, validator.version
                elif validator.__class__ is _Upcasting or (personal and _sealed_in(data)):
                    event, type_, schema_version = _decode_slowly(
                        validator, data, metadata, keys, type_, schema_version, self._personal
                    )
                else:  # the common case: the stored JSON straight into its class
                    event = validator.validate_json(data)
                    if tags and validator.__class__ is _RawValidator:
                        event = event.model_copy(update={"tags": tags})
                if at != last_at:
                    last_time = at if time_of is None else time_of(at)
                    last_at = at
                event_id = raw_id if id_of is None else id_of(raw_id)
            except Exception as exc:  # a row written around tidings, too: name where it is
                raise EventDecodeError(stream_id, version, position, _reason(exc)) from exc
            _set_private(event, "__pydantic_private__", {"_id": event_id})  # see Event.event_id
            yield _new_record(
                RecordedEvent,
                (
                    event_id,
                    stream_id,
                    version,
                    position,
                    type_,
                    schema_version,
                    last_time,
                    event,
                    metadata,
                    tags,
                ),
            )

    def _personal(self, type: str, schema_version: int) -> Mapping[str, str]:
        """The personal fields (and their subject fields) of the class `type` v`version`
        is read as; empty for most."""
        chain = self.registry.chain(type, schema_version)
        return chain[1].__personal__ if chain is not None else {}

    def _validator(self, type: str, schema_version: int) -> Any:
        """What turns this type's JSON into an event: its class's pydantic validator, or an
        `_Upcasting` one for an old version that upcasters lead to a class."""
        chain = self.registry.chain(type, schema_version)
        if chain is not None:
            steps, cls = chain
            return _Upcasting(steps, cls) if steps else cls.__pydantic_validator__
        if not self.keep_unknown:
            raise UnknownEventType(type, schema_version)
        return _RawValidator(type, schema_version)


class _Upcasting:
    """Decodes an old version: parse, run the upcasters, validate as the newest class."""

    __slots__ = ("steps", "type", "validate", "version")

    def __init__(self, steps: list[Upcaster], cls: type[Event]) -> None:
        self.steps = steps
        self.validate = cls.__pydantic_validator__.validate_python
        self.type: str = cls.__event_type__  # type: ignore[assignment]
        self.version = cls.__event_version__

    def upcast(self, data: str | bytes, metadata: Metadata) -> Event:
        return self.upcast_value(from_json(data), metadata)

    def upcast_value(self, value: Any, metadata: Metadata) -> Event:
        for step in self.steps:
            value = step(value, metadata)
        return self.validate(value, strict=False)  # type: ignore[no-any-return]


def _decode_slowly(
    validator: Any,
    data: str | bytes,
    metadata: Metadata,
    keys: Mapping[str, bytes] | None,
    type: str,
    version: int,
    personal: Callable[[str, int], Mapping[str, str]],
) -> tuple[Event, str, int]:
    """Decode data that may hold sealed personal values or is an old version: the event,
    and the type and version it arrives as. Raw (unknown) events stay as stored, sealed.
    Only the personal fields of the class it arrives as are opened (by their names)."""
    if validator.__class__ is _RawValidator:
        return validator.validate_json(data), type, version
    fields = personal(type, version)
    if fields and _sealed_in(data):  # open the personal values (or redact them)
        return _validate(validator, decrypt_fields(from_json(data), keys or {}, fields), metadata)
    if validator.__class__ is _Upcasting:
        return validator.upcast(data, metadata), validator.type, validator.version
    event = validator.validate_json(data)  # the marker was ordinary text in ordinary data
    return event, event.__event_type__, event.__event_version__


def _validate(validator: Any, value: Any, metadata: Metadata) -> tuple[Event, str, int]:
    """Validate parsed data (already opened) with a class validator or an upcasting one;
    returns the event and the type and version it arrives as."""
    if validator.__class__ is _Upcasting:
        return validator.upcast_value(value, metadata), validator.type, validator.version
    event = validator.validate_python(value, strict=False)
    return event, event.__event_type__, event.__event_version__


def _sealed(event: Event, keys: Mapping[str, bytes] | None) -> dict[str, Any]:
    """The event's data with each personal value encrypted (or redacted without keys)."""
    data: dict[str, Any] = event.__pydantic_serializer__.to_python(event, mode="json")
    for field, subject_field in event.__personal__.items():
        value = data.get(field)
        if value is None:
            continue
        subject = str(data[subject_field])
        data[field] = REDACTED if keys is None else encrypt(keys[subject], subject, field, value)
    return data


def _sealed_in(data: str | bytes) -> bool:
    """Whether stored data holds a sealed personal value (one substring search)."""
    return (_PREFIX_BYTES in data) if isinstance(data, bytes) else (PREFIX in data)


_PREFIX_BYTES = PREFIX.encode()


class _RawValidator:
    """Stands in for a pydantic validator when an unknown type is kept raw."""

    def __init__(self, type: str, version: int) -> None:
        self.type, self.version = type, version

    def validate_json(self, data: str | bytes) -> UnknownEvent:
        text = data if isinstance(data, str) else data.decode()
        return UnknownEvent(type=self.type, version=self.version, data=json.loads(text), raw=text)


_new_record = tuple.__new__

TAG_SEPARATOR = "\x1f"
"""Joins an event's tags where a store keeps them as one text (no tag holds a control
character)."""


def _with_tags(rows: Iterable[Sequence[Any]]) -> Iterable[Sequence[Any]]:
    """`rows` with ten columns: rows of nine (built by hand, or by an older caller, before
    events had tags) get no tags. Looks at the first row only, so the read path pays nothing."""
    if isinstance(rows, list):
        if rows and len(rows[0]) == 9:
            return [(*row, None) for row in rows]
        return rows
    return _with_tags(list(rows))


def _tags_of(raw: Any) -> tuple[str, ...]:
    """Stored tags as a tuple: text joined by `TAG_SEPARATOR`, or a list (PostgreSQL)."""
    if raw.__class__ is str:
        return tuple(raw.split(TAG_SEPARATOR))
    return tuple(raw)


_set_private = object.__setattr__


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first}" if not isinstance(exc, UnknownEventType) else first
