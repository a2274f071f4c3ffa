"""What the console's pages read from a store, each a bounded read by a cursor.

Every page reads at most one page of rows through an index: streams by stream id (the
`after` cursor), a stream's events by version, the global log by position, the events of a
`tag:` search by the tag index (a DCB query). Nothing here counts or scans the whole store:
the trace page reads one correlation through its index.
Events are only ever decoded through the store's read methods, so personal fields arrive
decrypted, or redacted once forgotten, exactly as every other reader sees them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tidings.cli import render
from tidings.core.query import Query, QueryItem
from tidings.core.recorded import RecordedEvent
from tidings.store import EventStore, StreamInfo
from tidings.store.base import StoreBase

__all__ = [
    "PAGE",
    "TRACE_SCAN",
    "Change",
    "LogPage",
    "StatePage",
    "StreamPage",
    "StreamsPage",
    "TaggedPage",
    "TraceNode",
    "TracePage",
    "changes",
    "event_data",
    "log_page",
    "record_json",
    "search_tags",
    "stream_page",
    "streams_page",
    "tag_search",
    "tagged_page",
    "trace_page",
]

PAGE = 50
"""Rows per page."""
TRACE_SCAN = 100_000
"""Events of one correlation the trace page shows at most."""
STATE_LIMIT = 10_000
"""Events the generic time-travel view folds at most."""


def event_data(record: RecordedEvent[Any]) -> Any:
    """The event's data as JSON-ready values, whether it decoded to a class or not (the
    same values `tidings events --json` prints)."""
    return render.event_data(record.event)


def pretty(value: Any) -> str:
    """Indented JSON text (shown as text: the templates escape it)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def record_json(record: RecordedEvent[Any]) -> dict[str, Any]:
    """One event as the live log sends it (the page writes it as text, never as HTML)."""
    return {
        **render.record_head(record),
        "recorded_at": record.recorded_at.isoformat(timespec="milliseconds"),
        "correlation_id": record.correlation_id,
        "tags": list(record.tags),
        "data": json.dumps(event_data(record), ensure_ascii=False, default=str),
    }


def _store_base(store: EventStore) -> StoreBase:
    if not isinstance(store, StoreBase):  # every backend is one; a protocol-only store is not
        raise TypeError(f"the console needs a tidings store, not {type(store).__name__}")
    return store


# -- streams ---------------------------------------------------------------------------------


@dataclass
class StreamsPage:
    streams: list[StreamInfo]
    query: str
    after: str
    next_after: str | None
    tagged: bool = False  # some event carries `query` as a tag: `tag:` finds them


async def streams_page(store: EventStore, query: str = "", after: str = "") -> StreamsPage:
    """One page of streams in stream-id order after `after`; `query` keeps the ids that
    start with it (a prefix search through the stream-id index: no scan). `tagged` says
    whether some event carries `query` exactly as a tag (one read of the tag index)."""
    base = _store_base(store)
    cursor = after
    if query and cursor < query:
        # every id starting with `query` sorts at or after it: start just before it
        cursor = query[:-1] + chr(ord(query[-1]) - 1) + "\U0010ffff" if ord(query[-1]) else ""
    found: list[StreamInfo] = []
    more = False
    while len(found) <= PAGE:
        batch = await base._streams_batch(cursor, PAGE + 1)
        for info in batch:
            if query and not info.stream_id.startswith(query):
                if info.stream_id < query:
                    continue
                batch = []  # past the prefix: done
                break
            found.append(info)
        if len(batch) < PAGE + 1:
            break
        cursor = batch[-1].stream_id
    if len(found) > PAGE:
        found, more = found[:PAGE], True
    tagged = bool(query) and await _any_tagged(store, query)
    return StreamsPage(found, query, after, found[-1].stream_id if more else None, tagged)


# -- events by tag ---------------------------------------------------------------------------

_TAG_TERM = re.compile(r'tag:(?:"((?:[^"\\]|\\.)*)"|(\S*))')
_ESCAPED = re.compile(r"\\(.)")


def search_tags(search: str) -> list[str] | None:
    """The tags of a tag search, None for a stream-id prefix search.

    A search starting with `tag:` is a tag search: one or more terms `tag:TAG`, separated
    by spaces, for the events carrying every one (`tag:course:c1 tag:student:7`); a tag
    holding spaces is quoted, `tag:"two words"`, with `\\"` and `\\\\` inside the quotes for
    a quote and a backslash. Raises ValueError for any other text in it, or an empty tag.
    """
    search = search.strip()
    if not search.startswith("tag:"):
        return None
    tags: list[str] = []
    at = 0
    while at < len(search):
        if search[at].isspace():
            at += 1
            continue
        term = _TAG_TERM.match(search, at)
        if term is None:
            raise ValueError(
                f"a tag search is terms of the form tag:TAG, not {search[at:].split()[0]!r}"
            )
        quoted, plain = term.groups()
        tag = _ESCAPED.sub(r"\1", quoted) if quoted is not None else plain
        if not tag:
            raise ValueError("tag: needs a tag after it, e.g. tag:course:c1")
        tags.append(tag)
        at = term.end()
    return list(dict.fromkeys(tags))


def tag_search(tag: str) -> str:
    """The search text that finds the events carrying `tag` (quoted if it holds spaces)."""
    if any(c.isspace() for c in tag) or tag.startswith('"'):
        return 'tag:"' + tag.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"tag:{tag}"


async def _any_tagged(store: EventStore, tag: str) -> bool:
    async for _ in store.read_all(query=Query(QueryItem(tags=[tag])), limit=1):
        return True
    return False


@dataclass
class TaggedPage:
    tags: list[str]
    records: list[RecordedEvent[Any]]  # oldest first
    after: int
    next_after: int | None


async def tagged_page(store: EventStore, tags: list[str], after: int = 0) -> TaggedPage:
    """The `PAGE` events after position `after` that carry every one of `tags`, from every
    stream, oldest first: a DCB query read through the store's tag index (no scan)."""
    query = Query(QueryItem(tags=tags))
    records = [r async for r in store.read_all(after, query=query, limit=PAGE + 1)]
    more = len(records) > PAGE
    records = records[:PAGE]
    return TaggedPage(tags, records, after, records[-1].position if more else None)


# -- one stream ------------------------------------------------------------------------------


@dataclass
class StreamPage:
    stream_id: str
    version: int
    records: list[RecordedEvent[Any]]
    start: int
    prev_start: int | None
    next_start: int | None


async def stream_page(store: EventStore, stream_id: str, start: int | None) -> StreamPage:
    """`PAGE` events of the stream from version `start` (default: the newest page)."""
    version = await store.stream_version(stream_id)
    if start is None:
        start = max(1, version - PAGE + 1)
    start = max(1, min(start, max(version, 1)))
    records = [r async for r in store.read_stream(stream_id, start, limit=PAGE)]
    prev_start = max(1, start - PAGE) if start > 1 else None
    next_start = start + PAGE if start + PAGE <= version else None
    return StreamPage(stream_id, version, records, start, prev_start, next_start)


# -- the global log --------------------------------------------------------------------------


@dataclass
class LogPage:
    records: list[RecordedEvent[Any]]  # newest first
    head: int
    before: int | None
    older: int | None
    newer: int | None


async def log_page(store: EventStore, before: int | None = None) -> LogPage:
    """The `PAGE` events before position `before` (default: the newest), newest first."""
    head = await store.last_position()
    end = head + 1 if before is None else max(1, min(before, head + 1))
    start = max(0, end - 1 - PAGE)
    records = [r async for r in store.read_all(start, limit=PAGE * 2) if r.position < end][-PAGE:]
    records.reverse()
    older = records[-1].position if records and records[-1].position > 1 else None
    newer = end + PAGE if before is not None and end <= head else None
    if newer is not None and newer > head:
        newer = None  # the newest page is the default one
    return LogPage(records, head, before, older, newer)


# -- time travel -----------------------------------------------------------------------------


@dataclass
class Change:
    """What one event changed in the state: keys added, changed (old, new) and removed."""

    record: RecordedEvent[Any]
    added: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    removed: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def changes(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]], dict[str, Any]]:
    """The keys `after` adds to, changes in, and removes from `before`."""
    added = {k: v for k, v in after.items() if k not in before}
    changed = {k: (before[k], v) for k, v in after.items() if k in before and before[k] != v}
    removed = {k: v for k, v in before.items() if k not in after}
    return added, changed, removed


@dataclass
class StatePage:
    stream_id: str
    version: int  # the version shown
    stream_version: int
    state: dict[str, Any]
    history: list[Change]  # one per event up to `version`, newest first (capped)
    kind: str  # "generic" or the aggregate class name
    note: str | None = None


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


async def state_page(
    store: EventStore,
    stream_id: str,
    version: int | None,
    aggregate: type[Any] | None = None,
) -> StatePage:
    """The state of `stream_id` right after event `version` (default: the newest).

    Without an aggregate class the state is the fold of the events' data: each event's
    fields merged over the previous ones (a generic view). With one, it is the aggregate's
    own state after applying the events, as `Repository.get(id, version=v)` would load it.
    """
    current = await store.stream_version(stream_id)
    target = current if version is None else max(1, min(version, current))
    note = None
    if target > STATE_LIMIT:
        note = f"only the first {STATE_LIMIT} events are folded here"
        target = STATE_LIMIT
    state: dict[str, Any] = {}
    history: list[Change] = []
    instance = None
    if aggregate is not None:
        category = aggregate.__category__
        instance = aggregate(stream_id[len(category) + 1 :])
    if target:
        async for record in store.read_stream(stream_id, 1, limit=target):
            if instance is not None:
                instance._apply_recorded(record)
                instance.version = record.version
                new = _json_safe(instance.snapshot_state())
            else:
                data = event_data(record)
                new = {**state, **(data if isinstance(data, dict) else {"value": data})}
            added, changed, removed = changes(state, new)
            history.append(Change(record, added, changed, removed))
            state = new
    history.reverse()
    kind = "generic" if aggregate is None else aggregate.__qualname__
    return StatePage(stream_id, target, current, state, history[:PAGE], kind, note)


# -- traces ----------------------------------------------------------------------------------


@dataclass
class TraceNode:
    record: RecordedEvent[Any]
    depth: int
    offset_ms: float  # since the first event of the trace
    parent_found: bool
    parent_offset_ms: float | None = None  # when the event that caused it was recorded


@dataclass
class TracePage:
    correlation_id: str
    nodes: list[TraceNode]
    scanned_from: int  # positions scanned: (scanned_from, scanned_to]
    scanned_to: int
    older: int | None  # scan the TRACE_SCAN events before this position next
    span_ms: float
    first_at: datetime | None


async def trace_page(store: EventStore, correlation_id: str, before: int | None) -> TracePage:
    """The events of one correlation id (at most `TRACE_SCAN`, found by the store's
    correlation index), as a causation tree in time order. `before` is kept for old links."""
    head = await store.last_position()
    found = (
        await store.read_correlation(correlation_id, limit=TRACE_SCAN)
        if isinstance(store, StoreBase)
        else []
    )
    start, end = 0, head
    by_id = {str(r.id): r for r in found}
    depth: dict[str, int] = {}

    def depth_of(record: RecordedEvent[Any], seen: int = 0) -> int:
        key = str(record.id)
        if key not in depth:
            parent = by_id.get(record.causation_id or "")
            depth[key] = 0 if parent is None or seen > 64 else depth_of(parent, seen + 1) + 1
        return depth[key]

    # a depth-first order: each event under the event that caused it, siblings by position
    children: dict[str | None, list[RecordedEvent[Any]]] = {}
    for record in found:
        parent_id = record.causation_id if record.causation_id in by_id else None
        children.setdefault(parent_id, []).append(record)
    ordered: list[RecordedEvent[Any]] = []
    stack = list(reversed(children.get(None, [])))
    seen: set[str] = set()
    while stack:
        record = stack.pop()
        if str(record.id) in seen:
            continue
        seen.add(str(record.id))
        ordered.append(record)
        stack.extend(reversed(children.get(str(record.id), [])))
    ordered += [r for r in found if str(r.id) not in seen]  # causation cycles, if any
    first = min((r.recorded_at for r in found), default=None)
    last = max((r.recorded_at for r in found), default=None)
    span = (last - first).total_seconds() * 1000 if first and last else 0.0

    def offset(record: RecordedEvent[Any]) -> float:
        return (record.recorded_at - first).total_seconds() * 1000 if first else 0.0

    nodes = []
    for r in ordered:
        parent = by_id.get(r.causation_id or "")
        nodes.append(
            TraceNode(
                r, depth_of(r), offset(r), parent is not None, offset(parent) if parent else None
            )
        )
    return TracePage(correlation_id, nodes, start, end, None, span, first)
