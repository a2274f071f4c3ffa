"""Process managers: the seed's order saga (the demo's order service), its compensation,
and reacting once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import tidings
from tidings import (
    CommandBus,
    ConfigurationError,
    EventStore,
    JSONCodec,
    ProcessDriver,
    ProcessManager,
    ProjectionRunner,
    Repository,
    handles,
)
from tidings.demo.orders import (
    HANDLERS,
    ORDERS,
    Order,
    OrderFulfilment,
    PlaceOrder,
    TakePayment,
)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    """Each backend, reading the order service's own events (its registry)."""
    async with tidings.open_store(store_url, codec=JSONCodec(registry=ORDERS)) as opened:
        yield opened


@pytest.fixture
def bus(store: EventStore) -> CommandBus:
    return CommandBus(store, *HANDLERS)


def order(order_id: str, **items: int) -> PlaceOrder:
    return PlaceOrder(order_id=order_id, customer="ada", email="ada@example.org", items=items)


@pytest.fixture
async def runner(bus: CommandBus) -> AsyncIterator[ProjectionRunner]:
    async with ProjectionRunner(bus.store, [ProcessDriver(OrderFulfilment, bus)]) as running:
        yield running


async def settle(runner: ProjectionRunner) -> None:
    """Wait until the saga has reacted to everything, including what its commands caused."""
    while True:
        head = await runner.store.last_position()
        await runner.wait_for(head)
        if await runner.store.last_position() == head:
            return


async def types_of(store: EventStore, stream: str) -> list[str]:
    return [r.type async for r in store.read_stream(stream)]


async def test_order_paid_and_shipped(
    bus: CommandBus, runner: ProjectionRunner, store: EventStore
) -> None:
    await bus.dispatch(order("o1", cable=1500, lamp=2500), correlation_id="checkout-1")
    await settle(runner)
    assert await types_of(store, "order-o1") == [
        "order.placed",
        "order.payment_taken",
        "order.shipped",
    ]
    saga = await Repository(store, OrderFulfilment).get("o1")
    assert (saga.status, saga.total_cents, saga.version) == ("completed", 4000, 3)
    records = [r async for r in store.read_all()]
    assert {r.correlation_id for r in records} == {"checkout-1"}  # one request, end to end
    placed = next(r for r in records if r.type == "order.placed")
    started = next(r for r in records if r.type == "fulfilment.started")
    assert started.causation_id == str(placed.id)  # the saga's fact is caused by the event


async def test_shipping_fails_so_the_payment_is_refunded(
    bus: CommandBus, runner: ProjectionRunner, store: EventStore
) -> None:
    await bus.dispatch(order("o2", cable=500, unicorn=2000))  # no unicorn in stock
    await settle(runner)
    assert await types_of(store, "order-o2") == [
        "order.placed",
        "order.payment_taken",
        "order.shipping_failed",
        "order.payment_refunded",
        "order.cancelled",
    ]
    cancelled = await Repository(store, Order).get("o2")
    assert (cancelled.status, cancelled.paid_cents) == ("cancelled", 0)
    saga = await Repository(store, OrderFulfilment).get("o2")
    assert saga.status == "cancelled"


async def test_a_reaction_saved_before_a_crash_is_not_repeated(store: EventStore) -> None:
    sent: list[TakePayment] = []

    @handles(TakePayment)
    def count_payment(command: TakePayment) -> None:
        sent.append(command)

    bus = CommandBus(store, HANDLERS[0], count_payment)
    driver = ProcessDriver(OrderFulfilment, bus)
    await bus.dispatch(order("o3", mouse=1000))
    [placed] = [r async for r in store.read_all()]
    await driver.react(placed)
    await driver.react(placed)  # redelivered: the checkpoint was not committed
    assert len(sent) == 1
    saga = await Repository(store, OrderFulfilment).get("o3")
    assert (saga.version, saga.processed_position) == (1, placed.position)


async def test_process_managers_are_checked_when_declared(store: EventStore) -> None:
    class NoReactions(ProcessManager):
        correlate_by = "order_id"

    with pytest.raises(ConfigurationError, match="no @reacts_to"):
        ProcessDriver(NoReactions, CommandBus(store))
    assert NoReactions.__category__ == "no_reactions"  # from the class name
    assert OrderFulfilment.__category__ == "fulfilment"  # given
