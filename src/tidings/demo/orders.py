"""The seed's two notification styles, between an order service and two consumers.

- The order service is event-sourced: placing an `Order` stores `order.placed` with the whole
  order. Its outbox relay publishes what was stored to the `orders` topic, and its query side
  (the `order_details` read model) answers "what is in order 42?".
- Event notification: the order service also announces each order on
  `order-notifications` with an `order.placed` that carries only the order id. The email
  service reads that and asks the order service for the details.
- Event-carried state transfer: the analytics service reads the full `order.placed` from
  `orders` and keeps its own copy (an SQLite table behind an inbox), so it never calls the
  order service and keeps working when it is down.

Each service decodes with its own classes (`Service(registry=...)`), as services built apart
do: the email service's `order.placed` has one field; the order service's has five.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidings.app.aggregate import Aggregate
from tidings.app.handlers import on
from tidings.app.inbox import SQLiteInbox
from tidings.app.outbox import OutboxRelay
from tidings.app.projections import Projection, ReadModel
from tidings.app.repository import Repository
from tidings.app.runner import ProjectionRunner
from tidings.app.service import Context, Retry, Service
from tidings.brokers.base import BrokerBase
from tidings.core.events import Event, TypeRegistry
from tidings.core.recorded import RecordedEvent
from tidings.store import EventStore

__all__ = [
    "NOTIFICATIONS",
    "ORDERS",
    "Order",
    "OrderDetails",
    "OrderPlaced",
    "OrderPlacedNotice",
    "OrdersRun",
    "run_orders",
]

ORDERS = TypeRegistry()
"""The order service's events (and the analytics service's copy of the contract)."""
NOTIFICATIONS = TypeRegistry()
"""The notification contract the email service reads: an id and nothing more."""


class OrderPlaced(Event, type="order.placed", registry=ORDERS):
    """An order was placed: everything about it (event-carried state transfer)."""

    order_id: str
    customer: str
    email: str
    items: list[str]
    total_cents: int


class OrderPlacedNotice(Event, type="order.placed", registry=NOTIFICATIONS):
    """An order was placed: its id only (event notification); ask the order service."""

    order_id: str


class Order(Aggregate, category="order"):
    """An order; placing it records `order.placed` with the whole order."""

    placed: bool = False

    @classmethod
    def place(cls, order_id: str, customer: str, email: str, items: dict[str, int]) -> Order:
        """A new order of `items` (name -> price in cents)."""
        order = cls(order_id)
        order.record(
            OrderPlaced(
                order_id=order_id,
                customer=customer,
                email=email,
                items=list(items),
                total_cents=sum(items.values()),
            )
        )
        return order

    @on(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.placed = True


class OrderDetails(Projection, name="order_details"):
    """The order service's query side: one document per order id."""

    @on(OrderPlaced)
    def placed(self, event: OrderPlaced, record: RecordedEvent[Any]) -> None:
        self.view.put(event.order_id, event.model_dump(mode="json"))


@dataclass
class OrdersRun:
    """What `run_orders` saw, for the demo to show."""

    placed: list[OrderPlaced]
    relayed: int
    """Events the order service's outbox relay published."""
    emails: list[str] = field(default_factory=list)
    """What the email service sent, built from the details it asked for."""
    lookups: int = 0
    """Calls the email service made to the order service (one per notification)."""
    analytics: dict[str, int] = field(default_factory=dict)
    """Revenue per customer, from the analytics service's own copy of the orders."""
    copies: int = 0
    """Orders in the analytics service's local table."""


SAMPLE = [
    ("o-1001", "ada", "ada@example.com", {"keyboard": 8900, "cable": 1200}),
    ("o-1002", "grace", "grace@example.com", {"monitor": 21900}),
    ("o-1003", "ada", "ada@example.com", {"mouse": 3400}),
]


async def run_orders(store: EventStore, broker: BrokerBase, folder: Path) -> OrdersRun:
    """Place the sample orders and let the relay, the email and the analytics services do
    their part; returns once every order has been mailed and copied."""
    repo = Repository(store, Order)
    details = ReadModel(store, OrderDetails)
    run = OrdersRun(placed=[], relayed=0)
    done = asyncio.Event()

    def check() -> None:
        if len(run.emails) == len(SAMPLE) and run.copies == len(SAMPLE):
            done.set()

    # The order service announces each stored order: a notice with the id only.
    notifier = Service("order-notifier", broker, registry=ORDERS)

    @notifier.handler("orders")
    async def announce(event: OrderPlaced, ctx: Context) -> None:
        notice = OrderPlacedNotice(order_id=event.order_id)
        await ctx.publish("order-notifications", notice, key=event.order_id)

    # Event notification: the email service gets an id and asks for the rest.
    email = Service("email", broker, registry=NOTIFICATIONS)

    @email.handler("order-notifications", retry=Retry(attempts=10, backoff=0.05))
    async def send_confirmation(notice: OrderPlacedNotice) -> None:
        run.lookups += 1
        order = await details.get(notice.order_id)  # a call to the order service
        if order is None:  # its read model is behind: eventual consistency, try again
            raise LookupError(f"order {notice.order_id} is not in the read model yet")
        run.emails.append(
            f"to {order['email']}: order {order['order_id']} ({', '.join(order['items'])}), "
            f"{order['total_cents'] / 100:.2f} EUR"
        )
        check()

    # Event-carried state transfer: analytics keeps its own copy, behind an inbox.
    inbox = SQLiteInbox(folder / "analytics.db")
    analytics = Service("analytics", broker, registry=ORDERS)

    @analytics.handler("orders", inbox=inbox)
    async def keep_copy(event: OrderPlaced, ctx: Context) -> None:
        ctx.db.execute(
            "insert into orders values (?, ?, ?, ?)",
            (event.order_id, event.customer, json.dumps(event.items), event.total_cents),
        )
        run.copies += 1
        check()

    async with inbox:
        assert inbox._conn is not None
        inbox._conn.execute(
            "create table if not exists orders "
            "(order_id text primary key, customer text, items text, total_cents int)"
        )
        for topic, group in (("orders", "order-notifier"), ("orders", "analytics")):
            await broker.declare(topic, group)
        await broker.declare("order-notifications", "email")
        relay = OutboxRelay(store, broker, {"order.placed": "orders"}, name="orders")
        services = [notifier, email, analytics]
        async with ProjectionRunner(store, [OrderDetails()]):
            tasks = [asyncio.create_task(s.run()) for s in services]
            tasks.append(asyncio.create_task(relay.run()))
            try:
                for order_id, customer, address, items in SAMPLE:
                    order = Order.place(order_id, customer, address, items)
                    await repo.save(order)
                    run.placed.append(OrderPlaced(**_fields(order_id, customer, address, items)))
                async with asyncio.timeout(30):
                    await done.wait()
            finally:
                relay.stop()
                for service in services:
                    service.stop()
                await asyncio.gather(*tasks, return_exceptions=True)
        run.relayed = relay.published
        rows = inbox._conn.execute(
            "select customer, sum(total_cents) from orders group by customer order by customer"
        ).fetchall()
        run.analytics = {customer: int(total) for customer, total in rows}
    return run


def _fields(order_id: str, customer: str, email: str, items: dict[str, int]) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer": customer,
        "email": email,
        "items": list(items),
        "total_cents": sum(items.values()),
    }
