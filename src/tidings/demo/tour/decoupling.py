"""Step 9, temporal decoupling: the analytics service stops, orders go on, and it catches
up from its consumer group when it comes back."""

from __future__ import annotations

import time

from rich.console import Console

from tidings.app.commands import CommandBus
from tidings.demo.services import revenue
from tidings.demo.tour.commands import _place
from tidings.demo.tour.common import (
    FIRST_ORDERS,
    LATER_ORDERS,
    Tour,
    _chapter,
    _money,
    _say,
    _until,
)
from tidings.demo.tour.workers import _Consumers


async def temporal_decoupling(
    bus: CommandBus, consumers: _Consumers, run: str, tour: Tour, out: Console
) -> None:
    _chapter(out, "9. Temporal decoupling: the analytics service goes away")
    await consumers.stop("analytics")
    copied = len(tour.copied)
    _say(out, f"Stopped the analytics service ({copied} orders copied so far).")
    for offset, (customer, items) in enumerate(LATER_ORDERS, start=len(FIRST_ORDERS) + 1):
        await _place(bus, f"o-{run}-{offset}", customer, items, tour, out)
    total = len(FIRST_ORDERS) + len(LATER_ORDERS) + 1
    await _until(lambda: len(tour.emails) >= total, "the email service to mail every order")
    tour.missed_while_stopped = total - len(tour.copied)
    _say(
        out,
        f"The order service and the email service went on ({len(tour.emails)} emails); "
        f"analytics has missed {tour.missed_while_stopped} orders, which wait in its "
        "consumer group on the broker.",
    )
    started = time.perf_counter()
    await consumers.start("analytics")
    await _until(lambda: len(tour.copied) >= total, "the analytics service to catch up")
    tour.caught_up_seconds = time.perf_counter() - started
    tour.revenue = revenue(consumers.analytics_db)
    _say(
        out,
        f"Started it again: it caught up on the {tour.missed_while_stopped} orders in "
        f"{tour.caught_up_seconds:.2f} s ({len(tour.copied)} copied); nobody waited for "
        f"it. Revenue now: {_money(tour.revenue)}",
    )
