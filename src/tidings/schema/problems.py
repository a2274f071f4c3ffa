"""What `check` reports: the modes it checks in, and `Problem`, one incompatibility.

Its own module so that the version rules (`compat`) and the field rules (`compare`) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["backward", "forward", "full"]
Kind = Literal["removed", "added", "required", "type", "version", "unreadable"]
MODES: tuple[Mode, ...] = ("backward", "forward", "full")


@dataclass(frozen=True, slots=True)
class Problem:
    """One incompatibility: the type and version it is in, the field (if any), and what."""

    type: str
    version: int
    field: str | None
    message: str
    mode: Literal["backward", "forward"]
    """The direction that found it: new code reading old events, or old consumers new ones."""
    kind: Kind
    """What changed: a field `removed`, `added` (required), made `required`, of another
    `type`; a `version` old consumers do not know; a stored version now `unreadable`."""

    def __str__(self) -> str:
        return f"{self.type} v{self.version}: {self.message}"
