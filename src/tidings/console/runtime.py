"""The state behind the console's pages: the stores, the broker, the token, the app parts
and the samples of projection lag the charts draw; `create_app` makes one `Console`.

Apart from the pages so that each page module reads it without importing the others.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException

from tidings.app.runner import ProjectionStatus, projection_status
from tidings.brokers.base import BrokerBase
from tidings.console.parts import AppParts
from tidings.core.errors import TidingsError
from tidings.store import EventStore

log = logging.getLogger("tidings.console")

SAMPLE_EVERY = 5.0  # seconds between two samples of projection lag, for the chart
SAMPLES = 720  # samples kept per projection: an hour at 5 s


def new_token() -> str:
    """A fresh random token for the actions that change state."""
    return secrets.token_urlsafe(24)


@dataclass
class StoreEntry:
    label: str
    store: EventStore


@dataclass
class Console:
    """The state behind the pages: stores, broker, token, app parts and lag samples."""

    stores: list[StoreEntry]
    broker: BrokerBase | None
    broker_label: str
    token: str
    parts: AppParts
    lag: dict[tuple[int, str], deque[tuple[float, int, float]]] = field(default_factory=dict)
    rebuilds: dict[tuple[int, str], str] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    last_sample: float = 0.0

    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest((given or "").encode(), self.token.encode())

    def entry(self, number: int) -> StoreEntry:
        if not 0 <= number < len(self.stores):
            raise HTTPException(404, f"no store number {number}")
        return self.stores[number]

    async def sample(self) -> dict[int, list[ProjectionStatus]]:
        """Every store's projection status, recorded for the lag charts."""
        now = time.time()
        out: dict[int, list[ProjectionStatus]] = {}
        for number, entry in enumerate(self.stores):
            try:
                found = await projection_status(entry.store)
            except (TidingsError, OSError) as exc:
                log.warning("console: projection status of %s: %s", entry.label, exc)
                continue
            out[number] = found
            for item in found:
                series = self.lag.setdefault((number, item.name), deque(maxlen=SAMPLES))
                series.append((now, item.lag_events, item.lag_seconds))
        self.last_sample = now
        return out

    async def sampler(self) -> None:
        while True:
            if time.time() - self.last_sample >= SAMPLE_EVERY * 0.9:
                await self.sample()
            await asyncio.sleep(SAMPLE_EVERY)
