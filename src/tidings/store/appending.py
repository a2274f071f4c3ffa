"""Appending: checking, encoding and storing a batch of events, then waking subscribers.

Everything about an append that does not depend on the database happens here, in this
order, for every backend: argument checks, correlation and trace metadata, sealing personal
fields, per-event size and duplicate checks; the backend then stores the encoded rows.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from tidings import telemetry
from tidings.core.codec import EncodedEvent
from tidings.core.context import with_correlation
from tidings.core.errors import (
    AppendConditionFailed,
    EventIdConflict,
    EventTooLarge,
    InvalidEvents,
)
from tidings.core.events import Event
from tidings.core.metadata import Metadata, MetadataLike
from tidings.core.query import AppendCondition, Selection
from tidings.store.contracts import ANY, AppendResult, ExpectedVersion
from tidings.store.personal import PersonalData
from tidings.store.validation import (
    _int64,
    _storable,
    validate_expected,
    validate_stream_id,
    validate_tags,
)

__all__ = ["Appending", "Condition", "EncodedAppend"]

_NO_KEYS: dict[str, bytes] = {}  # an append without personal values: nothing to seal


class Condition(NamedTuple):
    """An `AppendCondition` as a backend checks it: no event that `selection` selects (None:
    any event) may be stored after `after` (0 when the caller said None)."""

    selection: Selection | None
    after: int
    asked: int | None  # the caller's `after`, for the error

    def failed(self, stream_id: str, position: int, type: str) -> AppendConditionFailed:
        """The error for a conflicting event at `position` of `type`."""
        return AppendConditionFailed(stream_id, self.asked, position, type)


@dataclass(frozen=True, slots=True)
class EncodedAppend:
    """A checked and encoded append, as `Appending` hands it to a backend's `_append`."""

    stream_id: str
    expected: ExpectedVersion
    events: list[EncodedEvent]
    metadata: str | None
    condition: Condition | None = None


class Appending(PersonalData):
    """`append`, and the encoding every backend stores."""

    async def append(
        self,
        stream_id: str,
        events: Iterable[Event],
        expected_version: ExpectedVersion = ANY,
        metadata: MetadataLike | None = None,
        *,
        condition: AppendCondition | None = None,
    ) -> AppendResult:
        stream_id = validate_stream_id(stream_id)
        expected = validate_expected(expected_version)
        checked = self._condition(condition)
        if isinstance(events, (Event, str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise InvalidEvents(
                f"events must be a list of Event instances, not {type(events).__name__}"
            )
        if not isinstance(events, Sequence):
            events = list(events)  # a generator or set of events is fine, consumed once
        if not events:
            raise InvalidEvents(f"append to {stream_id!r} got no events")
        with telemetry.append_span(self, stream_id, len(events)) as span:
            meta = self.codec.encode_metadata(
                telemetry.traced(with_correlation(_storable(Metadata.coerce(metadata))), span)
            )
            keys = await self._keys_to_seal(events)
            encoded = self._encode(stream_id, events, len(meta.encode()) if meta else 0, keys)
            self._check_open()
            result = await self._append(EncodedAppend(stream_id, expected, encoded, meta, checked))
            telemetry.appended(self, len(encoded), span, result)
        self._signal.notify()
        return result

    def _encode(
        self,
        stream_id: str,
        events: Sequence[Event],
        metadata_size: int,
        keys: Mapping[str, bytes] | None = None,
    ) -> list[EncodedEvent]:
        encoded = []
        seen = set()
        for index, event in enumerate(events):
            item = self.codec.encode(event, index, keys if keys is not None else _NO_KEYS)
            size = item.size + metadata_size  # each event is stored with its own copy
            if size > self.max_event_size:
                raise EventTooLarge(stream_id, index, item.type, size, self.max_event_size)
            if item.tags:
                validate_tags(item.tags, stream_id, index, item.type)
            if item.id in seen:
                raise EventIdConflict(
                    stream_id, item.id, f"events[{index}] repeats an event of this append"
                )
            seen.add(item.id)
            encoded.append(item)
        return encoded

    def _condition(self, condition: AppendCondition | None) -> Condition | None:
        if condition is None:
            return None
        if not isinstance(condition, AppendCondition):
            raise TypeError(f"condition= takes an AppendCondition, not {condition!r}")
        after = condition.after
        selection = Selection.of(condition.query, self.codec.registry)
        return Condition(selection, 0 if after is None else _int64(after), after)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _append(self, batch: EncodedAppend) -> AppendResult:
        """Store `batch`'s events atomically, checking its expected version and retries."""
