"""The causation tree of one correlation: which command or event caused which, and when.

Every event carries its correlation id (the request) and causation id (the command or event
that directly caused it), and the `origin` header names who wrote it ("command PlaceOrder",
"service email"). `causation_tree` gathers one correlation's events from one or more stores
(services keep their own) and links each to its cause. A cause that is not a stored event,
such as a command (commands are not stored), becomes a node of its own, with the origin of
what it caused; a command sent while handling an event (by a process manager or a service)
hangs under that event, named by the `sent-by` header of what the command wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tidings.core.recorded import RecordedEvent
from tidings.store.base import EventStore, StoreBase

__all__ = ["TraceStep", "causation_tree"]


@dataclass
class TraceStep:
    """One node of a causation tree: a stored event, or a cause known only by its id."""

    id: str
    kind: str  # "event", "command" or "cause" (something not stored: a command, a message)
    type: str | None
    origin: str | None
    at: datetime | None
    store: str | None = None
    stream_id: str | None = None
    version: int | None = None
    position: int | None = None
    delay: float | None = None  # seconds after its cause
    children: list[TraceStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (`tidings trace --json`)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "type": self.type,
            "origin": self.origin,
            "at": self.at.isoformat() if self.at else None,
            "store": self.store,
            "stream_id": self.stream_id,
            "version": self.version,
            "position": self.position,
            "delay_seconds": None if self.delay is None else round(self.delay, 6),
            "children": [child.to_dict() for child in self.children],
        }


async def causation_tree(
    stores: Sequence[EventStore], correlation_id: str, *, names: Sequence[str] | None = None
) -> list[TraceStep]:
    """The roots of the causation tree of `correlation_id` across `stores` (named by `names`
    in the steps, e.g. their URLs); empty when no store has an event of it."""
    steps: dict[str, TraceStep] = {}
    causes: dict[str, str | None] = {}
    senders: dict[str, str] = {}  # a command's id -> the event whose handler sent it
    for index, store in enumerate(stores):
        if not isinstance(store, StoreBase):
            raise TypeError(f"{store!r} is not a tidings store")
        label = names[index] if names else None
        for record in await store.read_correlation(correlation_id):
            steps[str(record.id)] = _event_step(record, label)
            causes[str(record.id)] = record.causation_id
            sender = record.metadata.headers.get("sent-by")
            if sender is not None and record.causation_id is not None:
                senders[record.causation_id] = sender
    roots: list[TraceStep] = []
    for step_id, step in sorted(steps.items(), key=lambda item: _order(item[1])):
        cause = causes[step_id]
        if cause is None or cause == step_id:
            roots.append(step)
            continue
        parent = steps.get(cause)
        if parent is None:  # not stored: a command, or a message from elsewhere
            origin = step.origin or ""
            kind = "command" if origin.startswith("command ") else "cause"
            parent = steps[cause] = TraceStep(
                cause, kind, origin.removeprefix("command ") or None, step.origin, step.at
            )
            sent_by = steps.get(senders.get(cause, ""))
            if sent_by is None:
                roots.append(parent)
            else:  # a command sent while handling a stored event: under that event
                sent_by.children.append(parent)
                if sent_by.at is not None and parent.at is not None:
                    parent.delay = (parent.at - sent_by.at).total_seconds()
        parent.children.append(step)
        if parent.at is not None and step.at is not None:
            step.delay = (step.at - parent.at).total_seconds()
    return roots


def _event_step(record: RecordedEvent[Any], store: str | None) -> TraceStep:
    return TraceStep(
        str(record.id),
        "event",
        record.type,
        record.metadata.headers.get("origin"),
        record.recorded_at,
        store,
        record.stream_id,
        record.version,
        record.position,
    )


def _order(step: TraceStep) -> tuple[datetime | None, int]:
    return (step.at, step.position or 0)
