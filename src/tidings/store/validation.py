"""Checks on what callers hand a store, and the rule that tells a safe retry from a clash.

Every backend refuses the same bad input with the same error before touching its storage,
and decides a re-sent append the same way; these functions are that one shared definition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from tidings.core.errors import (
    EventIdConflict,
    InvalidEvents,
    InvalidExpectedVersion,
    InvalidMetadata,
    InvalidStreamId,
)
from tidings.core.events import Event
from tidings.core.metadata import Metadata
from tidings.store.contracts import ANY, STREAM_EXISTS, AppendResult, ExpectedVersion, StreamState

__all__ = [
    "MAX_STREAM_ID_LENGTH",
    "MAX_TAG_LENGTH",
    "expected_matches",
    "resolve_duplicates",
    "type_names",
    "validate_expected",
    "validate_stream_id",
    "validate_tags",
]

MAX_STREAM_ID_LENGTH = 512
MAX_TAG_LENGTH = 255  # characters; a tag is an index key, not a document
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def validate_stream_id(stream_id: object) -> str:
    """Return `stream_id` if it is storable; `InvalidStreamId` saying why if not."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(stream_id, f"must be a str, not {type(stream_id).__name__}")
    if not stream_id:
        raise InvalidStreamId(stream_id, "must not be empty")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(
            stream_id, f"{len(stream_id)} characters, over the limit of {MAX_STREAM_ID_LENGTH}"
        )
    try:
        stream_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidStreamId(stream_id, f"not valid unicode text ({exc.reason})") from None
    return stream_id


def validate_tags(tags: tuple[str, ...], stream_id: str, index: int, type: str) -> None:
    """Refuse a tag no store can index: not text, empty, over `MAX_TAG_LENGTH` characters,
    or holding a control character; `InvalidEvents` names the event and the tag."""
    for tag in tags:
        if not isinstance(tag, str):
            problem = f"is a {tag.__class__.__name__}, not a str"
        elif not tag:
            problem = "is empty"
        elif len(tag) > MAX_TAG_LENGTH:
            problem = f"has {len(tag)} characters, over the limit of {MAX_TAG_LENGTH}"
        elif _CONTROL.search(tag):
            problem = "holds a control character"
        else:
            continue
        raise InvalidEvents(
            f"append to {stream_id!r}: events[{index}] ({type}) has the tag {tag!r:.80}, "
            f"which {problem}"
        )


def _int64(value: int) -> int:
    """A position or version to look for, within the 64 bits stores keep them in: past the
    end, the end (no stored event is further), so every store answers alike."""
    return max(-(2**63), min(value, 2**63 - 1))


def _storable(metadata: Metadata) -> Metadata:
    """`metadata`, unless it holds a NUL character: PostgreSQL cannot keep one in JSON (its
    correlation index reads metadata as jsonb) and SQLite's JSON functions stop at one, so
    every store refuses it alike, before writing."""
    if metadata:
        texts = [metadata.correlation_id or "", metadata.causation_id or ""]
        texts += [*metadata.headers, *metadata.headers.values()]
        if any("\x00" in text for text in texts):
            raise InvalidMetadata("metadata cannot hold NUL characters (\\x00)")
    return metadata


def validate_expected(expected: object) -> ExpectedVersion:
    """Check the `expected_version` argument itself (not yet against the stream)."""
    if isinstance(expected, StreamState):
        return expected
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidExpectedVersion(expected)
    return expected


def expected_matches(expected: ExpectedVersion, actual: int) -> bool:
    """Whether a stream at version `actual` satisfies `expected`."""
    if expected is ANY:
        return True
    if expected is STREAM_EXISTS:
        return actual > 0
    return expected == actual


def type_names(types: Iterable[type[Event] | str] | None) -> frozenset[str] | None:
    """Normalise a `types=` filter to a set of type names."""
    if types is None:
        return None
    names = set()
    for item in types:
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, type) and issubclass(item, Event) and item.__event_type__:
            names.add(item.__event_type__)
        else:
            raise TypeError(f"types= takes Event classes or type names, not {item!r}")
    return frozenset(names)


def resolve_duplicates(
    stream_id: str,
    ids: Sequence[Any],
    found: dict[Any, tuple[str, int, int]],
) -> AppendResult:
    """Decide a retry: `found` maps already-stored ids to (stream, version, position).

    The same events, in this stream, at consecutive versions in this order, are the original
    append: its result is returned. Anything else is an `EventIdConflict`.
    """
    for event_id in ids:
        if event_id in found and found[event_id][0] != stream_id:
            raise EventIdConflict(
                stream_id, event_id, f"already stored in stream {found[event_id][0]!r}"
            )
    missing = [event_id for event_id in ids if event_id not in found]
    if missing:
        stored = next(event_id for event_id in ids if event_id in found)
        raise EventIdConflict(
            stream_id,
            stored,
            f"already stored, but {len(missing)} of the {len(ids)} events in this append are not; "
            "a retry must resend exactly the original events",
        )
    versions = [found[event_id][1] for event_id in ids]
    if versions != list(range(versions[0], versions[0] + len(versions))):
        raise EventIdConflict(stream_id, ids[0], "stored, but not in this order as one append")
    return AppendResult(version=versions[-1], position=found[ids[-1]][2])
