"""The `Broker` protocol, and the topic and group names every broker accepts."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from tidings.brokers.dead_letters import DeadLetter
from tidings.core.errors import ConfigurationError
from tidings.core.events import Event
from tidings.core.lifecycle import AsyncContext
from tidings.core.metadata import MetadataLike

__all__ = ["Broker", "check_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(kind: str, name: object) -> str:
    """A topic or group name every broker can use: letters, digits, `.`, `_`, `-`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{kind} {name!r}: use 1-200 letters, digits, '.', '_' or '-' (not first)"
        )
    return name


@runtime_checkable
class Broker(AsyncContext, Protocol):
    """Routes events from publishers to consumer groups; see docs/brokers.md."""

    async def publish(
        self,
        topic: str,
        event: Event,
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None: ...

    async def publish_many(
        self,
        topic: str,
        events: Iterable[Event],
        *,
        key: str | None = None,
        metadata: MetadataLike | None = None,
    ) -> None: ...

    def subscribe(self, topic: str, *, group: str) -> Any: ...

    async def dead_letters(self, topic: str | None = None) -> list[DeadLetter]: ...

    async def replay(self, dead_letter_id: str) -> DeadLetter: ...
