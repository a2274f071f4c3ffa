"""The demo's consumers: the order notifier, the email service and the analytics service.

Each is built by a function taking the broker and a callback that reports what it did, so
one definition runs inside `tidings demo`'s process or as a worker process of its own:

    python -m tidings.demo.services email --broker redis://127.0.0.1:6379 \\
        --store sqlite:///orders.db --folder /tmp/demo --prefix demo-1.

A worker prints `ready` once it consumes, then one JSON line per effect (`{"email": ...}`,
`{"copied": ...}`), and stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidings.app.inbox import SQLiteInbox
from tidings.app.projections import ReadModel
from tidings.app.service import Context, Retry, Service
from tidings.brokers import open_broker
from tidings.brokers.base import BrokerBase
from tidings.core.codec import JSONCodec
from tidings.demo.orders import (
    NOTIFICATIONS,
    ORDERS,
    OrderDetails,
    OrderPlaced,
    OrderPlacedNotice,
    euros,
)
from tidings.store import open_store

__all__ = [
    "ANALYTICS_DB",
    "Topics",
    "analytics_service",
    "declare",
    "email_service",
    "notifier_service",
    "revenue",
]

ANALYTICS_DB = "analytics.db"
"""The analytics service's own database (its copy of the orders and its inbox), in the
demo's folder."""


@dataclass(frozen=True)
class Topics:
    """The demo's topic names, under a prefix so runs on a shared broker never meet."""

    prefix: str = ""

    @property
    def orders(self) -> str:
        """Every order, whole: what the outbox relay publishes (event-carried state)."""
        return f"{self.prefix}orders"

    @property
    def notifications(self) -> str:
        """That an order was placed, by id (event notification)."""
        return f"{self.prefix}order-notifications"


async def declare(broker: BrokerBase, topics: Topics) -> None:
    """Create the consumer groups before anything is published, so none misses a message."""
    await broker.declare(topics.orders, "order-notifier")
    await broker.declare(topics.orders, "analytics")
    await broker.declare(topics.notifications, "email")


def notifier_service(broker: BrokerBase, topics: Topics) -> Service:
    """The order service's announcer: each stored order goes out again as an id-only notice."""
    service = Service("order-notifier", broker, registry=ORDERS)

    @service.handler(topics.orders)
    async def announce(event: OrderPlaced, ctx: Context) -> None:
        notice = OrderPlacedNotice(order_id=event.order_id)
        await ctx.publish(topics.notifications, notice, key=event.order_id)

    return service


def email_service(
    broker: BrokerBase, topics: Topics, details: ReadModel, sent: Callable[[str, bool], None]
) -> Service:
    """Event notification: gets an order id, asks the order service's read model for the
    rest, retrying while that read model lags (eventual consistency). `sent(line, retried)`
    hears each email."""
    service = Service("email", broker, registry=NOTIFICATIONS)

    @service.handler(topics.notifications, retry=Retry(attempts=20, backoff=0.05))
    async def send_confirmation(notice: OrderPlacedNotice, ctx: Context) -> None:
        order = await details.get(notice.order_id)  # a call to the order service
        if order is None:  # its read model is behind: eventual consistency, try again
            raise LookupError(f"order {notice.order_id} is not in the read model yet")
        sent(
            f"to {order['email']}: order {order['order_id']} ({', '.join(order['items'])}), "
            f"{euros(order['total_cents'])}",
            ctx.attempt > 1,
        )

    return service


def analytics_service(
    broker: BrokerBase, topics: Topics, inbox: SQLiteInbox, copied: Callable[[str], None]
) -> Service:
    """Event-carried state transfer: keeps its own copy of every order, written in one
    transaction with the inbox row, so a redelivered message changes nothing."""
    service = Service("analytics", broker, registry=ORDERS)

    @service.handler(topics.orders, inbox=inbox)
    async def keep_copy(event: OrderPlaced, ctx: Context) -> None:
        ctx.db.execute(
            "insert into orders values (?, ?, ?, ?)",
            (event.order_id, event.customer, json.dumps(event.items), event.total_cents),
        )
        copied(event.order_id)

    return service


def create_analytics_table(path: Path) -> None:
    """The analytics service's own table of orders (its schema, not the order service's)."""
    with sqlite3.connect(path) as conn:
        conn.execute("pragma journal_mode=wal")
        conn.execute(
            "create table if not exists orders "
            "(order_id text primary key, customer text, items text, total_cents int)"
        )
    conn.close()


def revenue(path: Path) -> dict[str, int]:
    """Revenue per customer, in cents, from the analytics service's own copy."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "select customer, sum(total_cents) from orders group by customer order by customer"
        ).fetchall()
    conn.close()
    return {customer: int(total) for customer, total in rows}


# -- running one service as a process ---------------------------------------------------------


async def _serve(name: str, broker_url: str, store_url: str, folder: Path, prefix: str) -> None:
    topics = Topics(prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)

    def say(**fields: object) -> None:
        print(json.dumps(fields), flush=True)

    async with open_broker(broker_url) as broker:
        if name == "email":
            async with open_store(store_url, codec=JSONCodec(ORDERS), create=False) as store:
                details = ReadModel(store, OrderDetails)
                await _until(email_service(broker, topics, details, _email(say)), stop, say)
        elif name == "analytics":
            create_analytics_table(folder / ANALYTICS_DB)
            async with SQLiteInbox(folder / ANALYTICS_DB) as inbox:
                service = analytics_service(broker, topics, inbox, lambda i: say(copied=i))
                await _until(service, stop, say)
        else:
            raise SystemExit(f"unknown service {name!r}: email or analytics")


def _email(say: Callable[..., None]) -> Callable[[str, bool], None]:
    return lambda line, retried: say(email=line, retried=retried)


async def _until(service: Service, stop: asyncio.Event, say: Callable[..., None]) -> None:
    running = asyncio.create_task(service.run())
    say(ready=service.name)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    service.stop()
    stopping.cancel()
    await running


def main(argv: list[str] | None = None) -> None:
    """`python -m tidings.demo.services NAME --broker URL --store URL --folder DIR`."""
    parser = argparse.ArgumentParser(description="Run one of the demo's services.")
    parser.add_argument("name", choices=["email", "analytics"])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--store", required=True, help="the order service's store (email)")
    parser.add_argument("--folder", required=True, type=Path)
    parser.add_argument("--prefix", default="", help="the topics' prefix")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.name, args.broker, args.store, args.folder, args.prefix))


if __name__ == "__main__":
    main()
