"""`tidings demo`'s story: every pattern of the seed article, as it happens, on one store.

1. Event sourcing: the account ledger (replay to 120, time travel, a refused stale writer,
   snapshots, a read model).
2. Schema evolution: an order the previous release stored as `order.placed` v1, read as v2.
3. Commands: the order service takes orders through its `CommandBus`.
4. Outbox: its relay publishes what was stored, and only that.
5. Event notification: the email service gets an id and asks for the rest.
6. Event-carried state transfer: the analytics service keeps its own copy.
7. A process manager: payment, shipping, and a refund when shipping fails.
8. CQRS: a second read model, orders by customer.
9. Temporal decoupling: analytics stops, orders go on, analytics catches up.
10. Debugging: the causation tree of one order.

The order service (store, command bus, relay, read models, process manager, notifier) runs
in this process. The email and analytics services run here too on the in-memory broker, or,
with a broker URL, as worker processes of their own (`tidings.demo.services`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from tidings.app.commands import CommandBus
from tidings.app.inbox import SQLiteInbox
from tidings.app.outbox import OutboxRelay
from tidings.app.process import ProcessDriver
from tidings.app.projections import ReadModel
from tidings.app.repository import Repository
from tidings.app.runner import ProjectionRunner
from tidings.app.service import Service
from tidings.app.trace import TraceStep, causation_tree
from tidings.brokers import open_broker
from tidings.brokers.base import BrokerBase
from tidings.cli import render
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.core.events import TypeRegistry, UnknownEvent
from tidings.core.urls import redact_url
from tidings.demo.ledger import LEDGER, SNAPSHOT_EVERY, AccountBalances, LedgerRun, run_ledger
from tidings.demo.orders import (
    HANDLERS,
    ORDERS,
    Order,
    OrderDetails,
    OrderFulfilment,
    OrdersByCustomer,
    PlaceOrder,
    euros,
)
from tidings.demo.services import (
    ANALYTICS_DB,
    Topics,
    analytics_service,
    create_analytics_table,
    declare,
    email_service,
    notifier_service,
    revenue,
)
from tidings.store import NO_STREAM, EventStore, open_store

__all__ = ["Tour", "run_tour"]

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


async def run_tour(
    store_url: str, folder: Path, out: Console, *, broker_url: str | None = None
) -> Tour:
    """Tell the whole story on the store at `store_url`, keeping the analytics service's
    database in `folder`; services run as processes when `broker_url` is given."""
    run = uuid4().hex[:4]
    tour = Tour(store_url)
    registry = TypeRegistry.merged(LEDGER, ORDERS)
    async with (
        open_store(store_url, codec=JSONCodec(registry)) as store,
        open_broker(broker_url or "memory://") as broker,  # a bad URL fails before the story
    ):
        if broker_url is not None and not getattr(store, "shared_across_processes", True):
            raise ConfigurationError(
                f"--broker runs the services as processes, which cannot share {store_url}: "
                "use a SQLite file or PostgreSQL"
            )
        _chapter(out, "1. Event sourcing: the account ledger")
        tour.ledger = await run_ledger(store)
        _show_ledger(out, tour.ledger)

        _chapter(out, "2. Schema evolution: an order from the previous release")
        await _legacy_order(store, f"o-{run}-0", tour, out)

        topics = Topics("" if broker_url is None else f"tidings-demo-{run}.")
        await declare(broker, topics)
        if broker_url is None:
            consumers: _Consumers = _InProcess(broker, topics, store, folder, tour)
        else:
            consumers = _Processes(broker_url, topics, store_url, folder, tour)
        await _orders(store, broker, topics, consumers, run, tour, out)
    return tour


# -- the chapters ------------------------------------------------------------------------------


def _chapter(out: Console, title: str) -> None:
    out.print()
    out.print(Rule(Text(title, style="bold"), align="left"))


def _say(out: Console, text: str, style: str = "") -> None:
    out.print(Text(text, style=style))


def _show_ledger(out: Console, run: LedgerRun) -> None:
    _say(
        out,
        f"Wrote 4 events to stream {run.stream_id} through Repository(Account): each save "
        "named the version it expected (NO_STREAM, then 1, 2, 3).",
    )
    if run.refusal is not None:
        _say(
            out,
            f"Optimistic concurrency: a second writer loaded the account at version "
            f"{run.refusal.expected} (balance {run.balance_at_2}) and tried to withdraw all "
            f"of it; its save was refused (the stream is at version {run.refusal.actual}); "
            "nothing was written.",
        )
    out.print(render.ledger_table(run.stream_id, run.steps))
    _say(
        out,
        f"Time travel: repo.get({run.account_id!r}, version=2) -> "
        f"balance as of version 2 = {run.balance_at_2}",
    )
    _say(out, f"Current state: balance = {run.balance}", "bold green")
    if run.snapshot_version is not None:
        after = run.steps[-1].record.version - run.snapshot_version
        _say(
            out,
            f"Snapshots: the repository saved the account's state every {SNAPSHOT_EVERY} "
            f"events; loading it now reads the snapshot at version {run.snapshot_version} and "
            f"{after} event after it, not the whole stream.",
        )
    _say(
        out,
        f"Read model (CQRS): after runner.wait_for({run.position}), "
        f"{AccountBalances.name}[{run.stream_id!r}] = {json.dumps(run.read_model)}",
    )


async def _legacy_order(store: EventStore, order_id: str, tour: Tour, out: Console) -> None:
    data = {
        "order_id": order_id,
        "customer": "grace",
        "email": CUSTOMERS["grace"],
        "items": ["cable"],
        "total": "42.50",
    }
    old = UnknownEvent(type="order.placed", version=1, data=data)  # as the old code wrote it
    orders = Repository(store, Order)
    await store.append(orders.stream_id(order_id), [old], expected_version=NO_STREAM)
    _say(
        out,
        f"The previous release stored order {order_id} as order.placed version 1, with the "
        f"total as EUR text: {json.dumps(data)}",
    )
    order = await orders.get(order_id)
    tour.legacy_total_cents = order.total_cents
    _say(
        out,
        "This release's OrderPlaced is version 2 (total_cents). The stored row is never "
        "rewritten; the upcaster placed_v1_to_v2 runs on each read, so the aggregate, the read "
        f"models, the relay and the consumers all see version 2: total_cents = "
        f"{order.total_cents}. The relay below publishes it as version 2 too.",
    )


async def _orders(
    store: EventStore,
    broker: BrokerBase,
    topics: Topics,
    consumers: _Consumers,
    run: str,
    tour: Tour,
    out: Console,
) -> None:
    bus = CommandBus(store, *HANDLERS)
    projections = [
        OrderDetails(),
        OrdersByCustomer(),
        ProcessDriver(OrderFulfilment, bus),
        AccountBalances(),  # the ledger's read model keeps up with the log too
    ]
    # One relay name for every run: on a kept store, a second run publishes only its own.
    relay = OutboxRelay(store, broker, {"order.placed": topics.orders}, name="demo-orders")
    notifier = notifier_service(broker, topics)
    details = ReadModel(store, OrderDetails)
    async with (
        ProjectionRunner(store, projections) as runner,
        relay,
        _running(notifier),
        consumers,
    ):
        _chapter(out, "3. Commands: the order service takes orders")
        for number, (customer, items) in enumerate(FIRST_ORDERS, start=1):
            await _place(bus, f"o-{run}-{number}", customer, items, tour, out)

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

        _chapter(out, "7. A process manager: payment, shipping, refund")
        await _until(
            lambda: _settled(store, runner, details, tour.orders),
            "every order to be shipped or refunded",
        )
        for order_id in tour.orders:
            document = await details.get(order_id)
            assert document is not None
            tour.statuses[order_id] = document["status"]
            refund = document.get("refunded_cents")
            shown = f"refunded {euros(refund)}, cancelled" if refund else document["status"]
            _say(out, f"  {order_id} ({', '.join(document['items'])}): {shown}")
        _say(
            out,
            "OrderFulfilment reacted to each order.placed by sending TakePayment, then "
            "ShipOrder; for the order with an item the warehouse does not stock, shipping "
            "failed and it compensated: RefundPayment, then CancelOrder. Its own state is an "
            "event stream too (fulfilment-<order id>).",
        )

        _chapter(out, "8. CQRS: one write model, read models shaped for each question")
        head = await store.last_position()
        await runner.wait_for(head)
        customers = ReadModel(store, OrdersByCustomer)
        for customer in sorted({c for c, _ in FIRST_ORDERS} | {"grace"}):
            document = await customers.get(customer)
            if document is not None:
                tour.by_customer[customer] = document
                _say(
                    out,
                    f"  orders_by_customer[{customer!r}]: {len(document['orders'])} orders, "
                    f"spent {euros(document['spent_cents'])}",
                )
        _say(
            out,
            f"Read right after runner.wait_for({head}): the position of the last write, so "
            "the query sees it (read-your-writes) while the read side stays eventually "
            "consistent for everyone else.",
        )

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

        _chapter(out, "10. Debugging: the causation tree of one order")
        head = await store.last_position()
        await runner.wait_for(head)
        refunded = next(o for o, s in tour.statuses.items() if s == "cancelled")
        tour.traced = _correlation(refunded)
        tour.trace = await causation_tree([store], tour.traced)
        _say(
            out,
            f"Every event of order {refunded} carries the correlation id {tour.traced} and the "
            "id of what caused it; each step names who wrote it:",
        )
        out.print(render.trace_tree(tour.traced, tour.trace, show_store=False, show_time=False))
        _say(out, f"The same tree, any time later: tidings trace {tour.traced} --store URL")


def _correlation(order_id: str) -> str:
    return f"checkout-{order_id}"


async def _place(
    bus: CommandBus, order_id: str, customer: str, items: dict[str, int], tour: Tour, out: Console
) -> None:
    command = PlaceOrder(
        order_id=order_id, customer=customer, email=CUSTOMERS[customer], items=items
    )
    position = await bus.dispatch(command, correlation_id=_correlation(order_id))
    tour.orders.append(order_id)
    _say(
        out,
        f"PlaceOrder {order_id} ({customer}: {', '.join(items)}) -> order.placed stored in "
        f"stream order-{order_id} at version 1, log position {position}",
    )


async def _settled(
    store: EventStore, runner: ProjectionRunner, details: ReadModel, orders: list[str]
) -> bool:
    head = await store.last_position()
    await runner.wait_for(head, timeout=WAIT)
    for order_id in orders:
        document = await details.get(order_id)
        if document is None or document["status"] not in ("shipped", "cancelled"):
            return False
    return True


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


# -- where the email and analytics services run --------------------------------------------------


class _Consumers:
    """The email and analytics services, started and stopped by name."""

    analytics_db: Path

    async def __aenter__(self) -> _Consumers:
        await self.start("email")
        await self.start("analytics")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for name in ("email", "analytics"):
            await self.stop(name)

    async def start(self, name: str) -> None:
        raise NotImplementedError

    async def stop(self, name: str) -> None:
        raise NotImplementedError

    def where(self, name: str) -> str:
        raise NotImplementedError


class _InProcess(_Consumers):
    """Both services as tasks of this process, on the in-memory broker."""

    def __init__(
        self, broker: BrokerBase, topics: Topics, store: EventStore, folder: Path, tour: Tour
    ) -> None:
        self.broker, self.topics, self.tour = broker, topics, tour
        self.details = ReadModel(store, OrderDetails)
        self.analytics_db = folder / ANALYTICS_DB
        create_analytics_table(self.analytics_db)
        self.inbox = SQLiteInbox(self.analytics_db)
        self.tasks: dict[str, tuple[Service, asyncio.Task[None]]] = {}

    async def __aenter__(self) -> _Consumers:
        await self.inbox.open()
        return await super().__aenter__()

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self.inbox.aclose()

    def _sent(self, line: str, retried: bool) -> None:
        self.tour.emails.append(line)
        self.tour.retried += retried

    async def start(self, name: str) -> None:
        if name == "email":
            service = email_service(self.broker, self.topics, self.details, self._sent)
        else:
            service = analytics_service(
                self.broker, self.topics, self.inbox, self.tour.copied.append
            )
        self.tasks[name] = (service, asyncio.create_task(service.run()))

    async def stop(self, name: str) -> None:
        service, task = self.tasks.pop(name)
        service.stop()
        await task

    def where(self, name: str) -> str:
        return "a task of this process, over the in-memory broker"


class _Processes(_Consumers):
    """Each service as a worker process of its own, talking over a real broker."""

    def __init__(
        self, broker_url: str, topics: Topics, store_url: str, folder: Path, tour: Tour
    ) -> None:
        self.broker_url, self.topics, self.tour = broker_url, topics, tour
        self.store_url, self.folder = store_url, folder
        self.analytics_db = folder / ANALYTICS_DB
        create_analytics_table(self.analytics_db)
        self.children: dict[str, tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = {}

    async def start(self, name: str) -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.demo.services",
            name,
            "--broker",
            self.broker_url,
            "--store",
            self.store_url,
            "--folder",
            str(self.folder),
            "--prefix",
            self.topics.prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        ready = asyncio.Event()
        self.children[name] = (child, asyncio.create_task(self._listen(child, ready)))
        self.tour.processes.setdefault(name, []).append(child.pid)
        try:
            async with asyncio.timeout(WAIT):
                await ready.wait()
        except TimeoutError:
            raise TimeoutError(f"the {name} worker process did not start") from None

    async def _listen(self, child: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert child.stdout is not None
        async for raw in child.stdout:
            line = json.loads(raw)
            if "ready" in line:
                ready.set()
            elif "email" in line:
                self.tour.emails.append(line["email"])
                self.tour.retried += bool(line["retried"])
            elif "copied" in line:
                self.tour.copied.append(line["copied"])

    async def stop(self, name: str) -> None:
        child, listening = self.children.pop(name)
        if child.returncode is None:
            child.terminate()  # SIGTERM: the service finishes its message and leaves
        try:
            async with asyncio.timeout(WAIT):
                await child.wait()
        except TimeoutError:
            child.kill()
            await child.wait()
        await listening

    def where(self, name: str) -> str:
        pid = self.tour.processes[name][-1]
        return f"worker process {pid}, over {redact_url(self.broker_url)}"
