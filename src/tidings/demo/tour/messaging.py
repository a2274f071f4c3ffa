"""Steps 4 to 6, what leaves the order service: the outbox relay publishes what was stored,
the email service gets a notification and asks for the rest, the analytics service gets the
whole order and keeps its own copy."""

from __future__ import annotations

from rich.console import Console

from tidings.app.outbox import OutboxRelay
from tidings.demo.services import ANALYTICS_DB, Topics, revenue
from tidings.demo.tour.common import Tour, _chapter, _money, _say, _until
from tidings.demo.tour.workers import _Consumers


async def outbox(relay: OutboxRelay, topics: Topics, tour: Tour, out: Console) -> None:
    _chapter(out, "4. Outbox: stored first, then published")
    await _until(lambda: relay.published >= 4, "the relay to publish 4 orders")
    tour.relayed = relay.published
    _say(
        out,
        f"The relay read the store's log and published {relay.published} order.placed "
        f"events to '{topics.orders}', each under its own id, keyed by its stream (one "
        "order's events keep their order). Its checkpoint moves only after the broker "
        "confirmed: an event reaches the broker if and only if it was stored, with no "
        "two-phase commit.",
    )


async def event_notification(
    topics: Topics, consumers: _Consumers, tour: Tour, out: Console
) -> None:
    _chapter(out, "5. Event notification: the email service")
    await _until(lambda: len(tour.emails) >= 4, "the email service to send 4 emails")
    _say(
        out,
        f"The order service announced each order on '{topics.notifications}' with its id "
        "only; the email service asked the order service's read model for the rest "
        f"({consumers.where('email')}).",
    )
    for line in tour.emails:
        _say(out, f"  email {line}")
    _say(
        out,
        f"Eventual consistency: {tour.retried} of these lookups found the read model "
        "behind and were retried (with backoff) rather than failed.",
    )


async def state_transfer(topics: Topics, consumers: _Consumers, tour: Tour, out: Console) -> None:
    _chapter(out, "6. Event-carried state transfer: the analytics service")
    await _until(lambda: len(tour.copied) >= 4, "the analytics service to copy 4 orders")
    tour.revenue = revenue(consumers.analytics_db)
    _say(
        out,
        f"The analytics service got the whole order in order.placed on '{topics.orders}' "
        f"and keeps its own copy ({len(tour.copied)} orders in {ANALYTICS_DB}, written in "
        "one transaction with its inbox, so a redelivery changes nothing); it never calls "
        f"the order service ({consumers.where('analytics')}). Revenue by customer, from "
        f"that copy: {_money(tour.revenue)}",
    )
