"""`run_tour`: the whole story, step by step, on one store: the ledger and the legacy order
first, then the order service (command bus, relay, read models, process manager, notifier)
running while the steps 3 to 10 are told.
"""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

from rich.console import Console

from tidings.app.commands import CommandBus
from tidings.app.outbox import OutboxRelay
from tidings.app.process import ProcessDriver
from tidings.app.projections import ReadModel
from tidings.app.runner import ProjectionRunner
from tidings.brokers import open_broker
from tidings.brokers.base import BrokerBase
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.core.events import TypeRegistry
from tidings.demo.ledger import LEDGER, AccountBalances, run_ledger
from tidings.demo.orders import (
    HANDLERS,
    ORDERS,
    OrderDetails,
    OrderFulfilment,
    OrdersByCustomer,
)
from tidings.demo.services import Topics, declare, notifier_service
from tidings.demo.tour.commands import take_orders
from tidings.demo.tour.common import Tour, _chapter, _running
from tidings.demo.tour.cqrs import cqrs
from tidings.demo.tour.debugging import debugging
from tidings.demo.tour.decoupling import temporal_decoupling
from tidings.demo.tour.evolution import _legacy_order
from tidings.demo.tour.ledger import _show_ledger
from tidings.demo.tour.messaging import event_notification, outbox, state_transfer
from tidings.demo.tour.process import process_manager
from tidings.demo.tour.workers import _Consumers, _InProcess, _Processes
from tidings.store import EventStore, open_store


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
        await take_orders(bus, run, tour, out)
        await outbox(relay, topics, tour, out)
        await event_notification(topics, consumers, tour, out)
        await state_transfer(topics, consumers, tour, out)
        await process_manager(store, runner, details, tour, out)
        await cqrs(store, runner, tour, out)
        await temporal_decoupling(bus, consumers, run, tour, out)
        await debugging(store, runner, tour, out)
