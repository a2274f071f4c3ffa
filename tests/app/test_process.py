"""Process managers: the seed's order saga, its compensation, and reacting once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.app.orders import (
    HANDLERS,
    OUT_OF_STOCK,
    Order,
    OrderFulfilment,
    PlaceOrder,
    TakePayment,
)
from tidings import (
    CommandBus,
    ConfigurationError,
    EventStore,
    ProcessDriver,
    ProcessManager,
    ProjectionRunner,
    Repository,
    handles,
)


@pytest.fixture
def bus(store: EventStore) -> CommandBus:
    return CommandBus(store, *HANDLERS)


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
    await bus.dispatch(PlaceOrder(order_id="o1", total=40), correlation_id="checkout-1")
    await settle(runner)
    assert await types_of(store, "order-o1") == [
        "test.order.placed",
        "test.order.payment_taken",
        "test.order.shipped",
    ]
    saga = await Repository(store, OrderFulfilment).get("o1")
    assert (saga.status, saga.total, saga.version) == ("completed", 40, 3)
    records = [r async for r in store.read_all()]
    assert {r.correlation_id for r in records} == {"checkout-1"}  # one request, end to end
    placed = next(r for r in records if r.type == "test.order.placed")
    started = next(r for r in records if r.type == "test.fulfilment.started")
    assert started.causation_id == str(placed.id)  # the saga's fact is caused by the event


async def test_shipping_fails_so_the_payment_is_refunded(
    bus: CommandBus, runner: ProjectionRunner, store: EventStore
) -> None:
    OUT_OF_STOCK.add("o2")
    try:
        await bus.dispatch(PlaceOrder(order_id="o2", total=25))
        await settle(runner)
    finally:
        OUT_OF_STOCK.discard("o2")
    assert await types_of(store, "order-o2") == [
        "test.order.placed",
        "test.order.payment_taken",
        "test.order.shipping_failed",
        "test.order.payment_refunded",
        "test.order.cancelled",
    ]
    order = await Repository(store, Order).get("o2")
    assert (order.status, order.paid) == ("cancelled", 0)
    saga = await Repository(store, OrderFulfilment).get("o2")
    assert saga.status == "cancelled"


async def test_a_reaction_saved_before_a_crash_is_not_repeated(store: EventStore) -> None:
    sent: list[TakePayment] = []

    @handles(TakePayment)
    def count_payment(command: TakePayment) -> None:
        sent.append(command)

    bus = CommandBus(store, HANDLERS[0], count_payment)
    driver = ProcessDriver(OrderFulfilment, bus)
    await bus.dispatch(PlaceOrder(order_id="o3", total=10))
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
    assert OrderFulfilment.__category__ == "order_fulfilment"
