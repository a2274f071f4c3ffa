"""Event metadata: what is known about an event besides its data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidings.core.errors import InvalidMetadata

__all__ = ["Metadata", "MetadataLike"]


@dataclass(frozen=True, slots=True)
class Metadata:
    """Correlation and causation ids plus free string headers.

    `correlation_id` ties together everything one request caused; `causation_id` is the id of
    the command or event that directly caused this one. `headers` carry anything else
    (tenant, user, traceparent) as strings, so every store and broker can keep them.
    Treat `headers` as read-only: records read together may share one `Metadata`.
    """

    correlation_id: str | None = None
    causation_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("correlation_id", "causation_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, str(value))  # UUIDs and ints are welcome
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidMetadata(
                    f"metadata headers must map str to str; got {key!r}: {value!r}"
                )
        object.__setattr__(self, "headers", dict(self.headers))

    @classmethod
    def coerce(cls, value: MetadataLike | None) -> Metadata:
        """Accept a `Metadata`, a flat mapping, or None (no metadata)."""
        if value is None:
            return EMPTY
        if isinstance(value, Metadata):
            return value
        if not isinstance(value, Mapping):
            raise InvalidMetadata(
                f"metadata must be a Metadata or a mapping, not {type(value).__name__}"
            )
        headers = {k: v for k, v in value.items() if k not in _RESERVED}
        nested = value.get("headers")
        if isinstance(nested, Mapping):  # the stored form, {"headers": {...}}, reads back too
            headers.update(nested)
        elif nested is not None:
            headers["headers"] = nested
        return cls(value.get("correlation_id"), value.get("causation_id"), headers)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict without empty entries (the stored form)."""
        out: dict[str, Any] = {}
        if self.correlation_id is not None:
            out["correlation_id"] = self.correlation_id
        if self.causation_id is not None:
            out["causation_id"] = self.causation_id
        if self.headers:
            out["headers"] = dict(self.headers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metadata:
        """Inverse of `to_dict`."""
        return cls(data.get("correlation_id"), data.get("causation_id"), data.get("headers") or {})

    def __bool__(self) -> bool:
        return (
            self.correlation_id is not None or self.causation_id is not None or bool(self.headers)
        )


EMPTY = Metadata()
_RESERVED = ("correlation_id", "causation_id", "headers")

MetadataLike = Metadata | Mapping[str, str]
