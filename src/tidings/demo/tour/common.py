"""What every step of the tour shares: the customers and their orders, `Tour` (what the
story saw), printing a chapter, and waiting for a step (`WAIT` seconds at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from tidings.app.service import Service
from tidings.app.trace import TraceStep
from tidings.demo.ledger import LedgerRun
from tidings.demo.orders import euros

WAIT = 60.0
"""Seconds any step may take before the demo gives up with an error naming the step."""

CUSTOMERS = {
    "ada": "ada@example.com",
    "grace": "grace@example.com",
    "edsger": "edsger@example.com",
}
FIRST_ORDERS = [
    ("ada", {"keyboard": 8900, "cable": 1200}),
    ("grace", {"monitor": 21900}),
    ("ada", {"mouse": 3400, "unicorn": 99900}),  # no unicorn in stock: refunded
]
LATER_ORDERS = [("edsger", {"lamp": 4500}), ("grace", {"desk": 32000})]


@dataclass
class Tour:
    """What the story saw, for tests and for the closing lines."""

    store: str
    ledger: LedgerRun | None = None
    legacy_total_cents: int | None = None
    orders: list[str] = field(default_factory=list)
    relayed: int = 0
    emails: list[str] = field(default_factory=list)
    retried: int = 0
    copied: list[str] = field(default_factory=list)
    revenue: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    by_customer: dict[str, Any] = field(default_factory=dict)
    missed_while_stopped: int = 0
    caught_up_seconds: float = 0.0
    traced: str = ""
    trace: list[TraceStep] = field(default_factory=list)
    processes: dict[str, list[int]] = field(default_factory=dict)
    """The pids of each service's worker processes, in start order (with a broker URL)."""


def _chapter(out: Console, title: str) -> None:
    out.print()
    out.print(Rule(Text(title, style="bold"), align="left"))


def _say(out: Console, text: str, style: str = "") -> None:
    out.print(Text(text, style=style))


def _correlation(order_id: str) -> str:
    return f"checkout-{order_id}"


def _money(by_customer: dict[str, int]) -> str:
    return ", ".join(f"{who} {euros(cents)}" for who, cents in by_customer.items())


async def _until(condition: Callable[[], Any], what: str) -> None:
    """Poll `condition` (a function, sync or async) until true; a TimeoutError naming
    `what` after `WAIT` seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        outcome = condition()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo waited {WAIT:g} s for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _running(service: Service) -> Any:
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        await task
