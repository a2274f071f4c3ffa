"""One upcasting step, and the error for a chain of them with a gap.

Both the registry that runs the steps (`tidings.core.events.TypeRegistry`) and the decorator
that declares them (`tidings.core.upcasting.upcaster`) need these; here they depend on
neither, so `upcasting` imports `events` and `events` imports nothing of `upcasting`. Import
them from `tidings` or `tidings.core.upcasting`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidings.core.errors import ConfigurationError
from tidings.core.metadata import Metadata

__all__ = ["Upcaster", "UpcasterGap"]


class UpcasterGap(ConfigurationError):
    """A chain of upcasters that cannot reach a registered class (a missing step)."""


@dataclass(frozen=True, slots=True)
class Upcaster:
    """One step: data of (`type`, `from_version`) to data of (`to_type`, `to_version`)."""

    type: str
    from_version: int
    to_type: str
    to_version: int
    function: Callable[..., dict[str, Any]]
    takes_metadata: bool

    def __call__(self, data: dict[str, Any], metadata: Metadata) -> dict[str, Any]:
        out = self.function(data, metadata) if self.takes_metadata else self.function(data)
        if not isinstance(out, dict):
            raise TypeError(
                f"upcaster {self.function.__qualname__} returned {type(out).__name__}, not a dict"
            )
        return out
