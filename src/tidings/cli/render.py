"""What the CLI shows, as values: rich renderables and JSON-ready dicts, never printed here.

Commands print these at the edge, so the same table or line serves the terminal, tests and
(later) other front ends. Cells are `Text`, never markup strings: event data containing
`[brackets]` must show as written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from tidings.app.trace import TraceStep
from tidings.core.events import Event, UnknownEvent
from tidings.core.recorded import RecordedEvent
from tidings.demo.ledger import LedgerStep
from tidings.store import StreamInfo

__all__ = [
    "compact_table",
    "error_line",
    "event_data",
    "events_table",
    "json_line",
    "ledger_table",
    "log_line",
    "record_dict",
    "record_head",
    "stream_dict",
    "streams_table",
    "trace_tree",
]


def error_line(message: object) -> str:
    """`error: …` on one line, whatever `message` holds, so scripts can grep stderr."""
    return "error: " + " ".join(str(message).split())


def event_data(event: Event) -> dict[str, Any]:
    """The event's fields as JSON-ready data, for typed events and `UnknownEvent` alike."""
    if isinstance(event, UnknownEvent):
        return event.data
    return event.model_dump(mode="json")


def record_head(record: RecordedEvent[Any]) -> dict[str, Any]:
    """Which event, where: the leading keys of every JSON shape of a stored event."""
    return {
        "id": str(record.id),
        "stream_id": record.stream_id,
        "version": record.version,
        "position": record.position,
        "type": record.type,
    }


def record_dict(record: RecordedEvent[Any]) -> dict[str, Any]:
    """One stored event as a flat JSON-ready dict: the shape of `--json` output."""
    return {
        **record_head(record),
        "schema_version": record.schema_version,
        "recorded_at": record.recorded_at.isoformat(),
        "tags": list(record.tags),
        "data": event_data(record.event),
        "metadata": record.metadata.to_dict(),
    }


def stream_dict(info: StreamInfo) -> dict[str, Any]:
    """One stream as a JSON-ready dict: the shape of `streams --json` output."""
    return {"stream_id": info.stream_id, "version": info.version}


def json_line(value: Mapping[str, Any]) -> str:
    """`value` as one line of JSON (JSON Lines), non-ASCII text kept readable."""
    return json.dumps(value, ensure_ascii=False)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _when(record: RecordedEvent[Any]) -> str:
    """`recorded_at` in UTC to the millisecond, for people: `2026-01-02 03:04:05.678`."""
    return record.recorded_at.astimezone(UTC).isoformat(" ", timespec="milliseconds")[:23]


def compact_table(title: str, **options: Any) -> Table:
    """A table titled `title` (shown as written) with a rule under the headers and no
    padding to spare: the look of every wide CLI table."""
    return Table(
        title=Text(title),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        **options,
    )


def events_table(
    stream_id: str | None, records: Iterable[RecordedEvent[Any]], tags: Sequence[str] = ()
) -> Table:
    """Events as a table, one row each, tags one a line, data and metadata as JSON.

    One stream's (`stream_id`), or, with None, events of any stream (a `stream` column
    comes first); `tags`, the tags they were selected by, go in the title."""
    title = f"stream {stream_id}" if stream_id is not None else "events"
    if tags:
        title += " tagged " + ", ".join(tags)
    table = compact_table(title)
    # Narrow terminals fold long cells instead of hiding columns; --json is for machines.
    if stream_id is None:
        table.add_column("stream", overflow="fold", min_width=8)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("position", justify="right", no_wrap=True)
    table.add_column("type", overflow="fold", min_width=10)
    table.add_column("schema", justify="right", no_wrap=True)
    table.add_column("recorded_at (UTC)", overflow="fold", min_width=10)
    table.add_column("tags", overflow="fold", min_width=6, ratio=1)
    table.add_column("data", overflow="fold", min_width=14, ratio=3)
    table.add_column("metadata", overflow="fold", min_width=8, ratio=1)
    for record in records:
        metadata = record.metadata.to_dict()
        table.add_row(
            *([Text(record.stream_id)] if stream_id is None else []),
            Text(str(record.version)),
            Text(str(record.position)),
            Text(record.type),
            Text(str(record.schema_version)),
            Text(_when(record)),
            Text("\n".join(record.tags)),
            Text(_compact(event_data(record.event))),
            Text(_compact(metadata) if metadata else ""),
        )
    return table


def streams_table(streams: Iterable[StreamInfo]) -> Table:
    """Every stream id with its version (its number of events)."""
    table = Table(title=Text("streams"), title_justify="left")
    table.add_column("stream", overflow="fold")
    table.add_column("version", justify="right")
    for info in streams:
        table.add_row(Text(info.stream_id), Text(str(info.version)))
    return table


def log_line(record: RecordedEvent[Any]) -> Text:
    """One event of the global log as a line: position, time, stream@version, type, data."""
    line = Text()
    line.append(f"{record.position:>6}  ", style="bold")
    line.append(_when(record) + "  ", style="dim")
    line.append(f"{record.stream_id}@{record.version}  ", style="cyan")
    line.append(f"{record.type} v{record.schema_version}  ", style="green")
    line.append(_compact(event_data(record.event)))
    return line


def ledger_table(stream_id: str, steps: Iterable[LedgerStep]) -> Table:
    """The ledger replay: each event read back from the store and the balance after it."""
    table = Table(title=Text(f"replaying {stream_id} from the store"), title_justify="left")
    table.add_column("version", justify="right")
    table.add_column("position", justify="right")
    table.add_column("event")
    table.add_column("data")
    table.add_column("balance", justify="right", style="bold")
    for step in steps:
        record = step.record
        table.add_row(
            Text(str(record.version)),
            Text(str(record.position)),
            Text(record.type),
            Text(_compact(event_data(record.event))),
            Text(str(step.balance)),
        )
    return table


def trace_tree(
    correlation_id: str,
    roots: Iterable[TraceStep],
    *,
    show_store: bool,
    show_time: bool = True,
) -> Tree:
    """A causation tree (`tidings trace`): each step under its cause, with the delay after
    it, who wrote it and (`show_time`) when; `show_store` adds each event's store (for
    several stores)."""
    tree = Tree(Text(f"correlation {correlation_id}", style="bold"))
    for root in roots:
        _add_step(tree, root, show_store, show_time)
    return tree


def _add_step(parent: Tree, step: TraceStep, show_store: bool, show_time: bool) -> None:
    line = Text()
    if step.delay is not None:
        line.append(f"+{_duration(step.delay)} ", style="dim")
    if step.kind == "event":
        line.append(step.type or "?", style="bold")
        line.append(f"  {step.stream_id} v{step.version}")
    else:
        line.append(f"{step.kind} {step.type or step.id}", style="bold cyan")
    if step.origin and step.kind == "event":
        line.append(f"  by {step.origin}", style="magenta")
    if show_time and step.at is not None:
        line.append(f"  {step.at.isoformat(timespec='milliseconds')}", style="dim")
    if show_store and step.store:
        line.append(f"  [{step.store}]", style="dim")
    branch = parent.add(line)
    for child in step.children:
        _add_step(branch, child, show_store, show_time)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"
