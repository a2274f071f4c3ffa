"""The correlation context: which request an event belongs to, and what directly caused it.

A correlation id starts where a request enters (a command, an incoming message, or
`with correlate(...)`) and every event appended inside that context carries it; the causation
id is the id of the command or event being handled. Context variables carry both across
`await`s and into tasks started inside the block, so no code has to pass them by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from tidings.core.ids import uuid7
from tidings.core.metadata import Metadata

__all__ = ["Correlation", "caused_by", "correlate", "current_correlation", "with_correlation"]


@dataclass(frozen=True, slots=True)
class Correlation:
    """The request (`correlation_id`) and the direct cause (`causation_id`) of new events."""

    correlation_id: str
    causation_id: str | None = None
    origin: str | None = None
    """Who acts here ("command PlaceOrder", "service email"): stamped on new events as the
    `origin` header, so a trace can say which step wrote what."""
    sent_by: str | None = None
    """What caused the cause, when the cause is not stored: the event whose handler sent the
    command being run. Stamped as the `sent-by` header, so a trace hangs the command under
    that event instead of showing it as a root."""


_current: ContextVar[Correlation | None] = ContextVar("tidings_correlation", default=None)


def current_correlation() -> Correlation | None:
    """The correlation in effect here, or None outside any."""
    return _current.get()


@contextmanager
def correlate(
    correlation_id: str | UUID | None = None,
    causation_id: str | UUID | None = None,
    *,
    origin: str | None = None,
    sent_by: str | None = None,
) -> Iterator[Correlation]:
    """Run a block inside a correlation: events appended in it carry these ids.

    Without `correlation_id`, the one already in effect continues, or a new one starts.
    `sent_by` names what caused `causation_id` when that is not stored (see `Correlation`).
    """
    outer = _current.get()
    if correlation_id is None:
        correlation_id = outer.correlation_id if outer else str(uuid7())
    if causation_id is None and outer is not None:
        causation_id = outer.causation_id
    if origin is None and outer is not None:
        origin = outer.origin
    value = Correlation(
        str(correlation_id), None if causation_id is None else str(causation_id), origin, sent_by
    )
    token = _current.set(value)
    try:
        yield value
    finally:
        _current.reset(token)


class caused_by:
    """Handle a message: what happens inside is caused by it and continues its correlation.

    A message without a correlation id starts one named after itself, so the chain it
    begins can still be followed. (A class, not a generator: every delivery enters one.)
    """

    __slots__ = ("_token", "value")

    def __init__(
        self, message_id: Any, correlation_id: str | None = None, origin: str | None = None
    ) -> None:
        cause = str(message_id)
        self.value = Correlation(correlation_id or cause, cause, origin)

    def __enter__(self) -> Correlation:
        self._token = _current.set(self.value)
        return self.value

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


def with_correlation(metadata: Metadata) -> Metadata:
    """`metadata` with the context's ids filled in where it has none of its own."""
    current = _current.get()
    if current is None:
        return metadata
    stamp = current.origin is not None and "origin" not in metadata.headers
    if metadata.correlation_id is not None and metadata.causation_id is not None and not stamp:
        return metadata
    headers = metadata.headers
    if stamp:
        headers = {**headers, "origin": current.origin}  # type: ignore[dict-item]
        if current.sent_by is not None and metadata.causation_id is None:
            headers["sent-by"] = current.sent_by
    return Metadata(
        metadata.correlation_id or current.correlation_id,
        metadata.causation_id or current.causation_id,
        headers,
    )
