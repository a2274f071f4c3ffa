"""The outbox relay: every stored event reaches its topic under its own id, from a
checkpoint, with one relay active per name through a lease."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tidings
from tests.backends import BROKER_BACKENDS, broker_url, require
from tidings import OutboxRelay, open_broker, open_store, routes
from tidings.brokers import BrokerBase
from tidings.core.recorded import RecordedEvent


class Placed(tidings.Event, type="test.outbox.placed"):
    order_id: str


class Deposited(tidings.Event, type="test.outbox.deposited"):
    amount: int


def _record(type_: str, stream: str) -> RecordedEvent[Placed]:
    from datetime import UTC, datetime

    return RecordedEvent(
        uuid.uuid4(),
        stream,
        1,
        1,
        type_,
        1,
        datetime.now(UTC),
        Placed(order_id="x"),
        tidings.Metadata(),
    )


def test_routes_match_types_and_categories_first_match_wins() -> None:
    route = routes(["category:account=ledger", "test.outbox.*=orders", "*=everything"])
    assert route(_record("test.outbox.placed", "account-1")) == "ledger"
    assert route(_record("test.outbox.placed", "order-1")) == "orders"
    assert route(_record("other.thing", "x-1")) == "everything"
    assert routes({"order.*": "orders"})(_record("billing.paid", "b-1")) is None


@pytest.mark.parametrize("rules", [[], ["no-equals-sign"], ["=topic"], ["pattern="]])
def test_bad_routes_are_refused_with_the_rule(rules: list[str]) -> None:
    with pytest.raises(tidings.ConfigurationError):
        routes(rules)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tidings.EventStore]:
    async with open_store(f"sqlite:///{tmp_path / 'events.db'}") as store:
        yield store


@pytest.fixture(params=BROKER_BACKENDS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerBase]:
    require(request.param)
    async with open_broker(broker_url(request.param)) as opened:
        yield opened


async def _collect(broker: BrokerBase, topic: str, count: int) -> list[tidings.Delivery]:
    got: list[tidings.Delivery] = []

    async def read() -> None:
        async with broker.subscribe(topic, group="g") as deliveries:
            async for delivery in deliveries:
                got.append(delivery)
                await delivery.ack()
                if len(got) == count:
                    return

    await asyncio.wait_for(read(), 20)
    return got


async def test_the_relay_publishes_every_stored_event_under_its_id(
    sqlite_store: tidings.EventStore, broker: BrokerBase
) -> None:
    orders, ledger = f"o-{uuid.uuid4().hex[:8]}", f"l-{uuid.uuid4().hex[:8]}"
    await broker.declare(orders, "g")
    await broker.declare(ledger, "g")
    with tidings.correlate("req-1"):
        placed = await sqlite_store.append("order-1", [Placed(order_id="1")], expected_version=0)
    await sqlite_store.append("account-7", [Deposited(amount=n) for n in range(1, 6)])
    await sqlite_store.append("audit-1", [Deposited(amount=99)])  # routed nowhere
    relay = OutboxRelay(
        sqlite_store, broker, {"category:account": ledger, "test.outbox.placed": orders}
    )
    assert await relay.catch_up() == await sqlite_store.last_position()
    assert relay.published == 6
    [order] = await _collect(broker, orders, 1)
    [stored] = [r async for r in sqlite_store.read_stream("order-1")]
    assert order.message.id == str(stored.id) and order.key == "order-1"
    assert order.record.correlation_id == "req-1" and order.record.version == 1
    assert order.record.position == placed.position
    deposits = await _collect(broker, ledger, 5)
    assert [d.event.amount for d in deposits] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert {d.key for d in deposits} == {"account-7"}
    # Nothing new: a second catch-up publishes nothing.
    await relay.catch_up()
    assert relay.published == 6


async def test_a_second_relay_takes_over_when_the_active_one_dies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    async with open_store(url) as store, open_broker("memory://") as broker:
        await broker.declare("all", "g")
        first = OutboxRelay(store, broker, ["*=all"], lease=0.6, owner="first")
        second = OutboxRelay(store, broker, ["*=all"], lease=0.6, owner="second")
        running = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
        await store.append("a-1", [Deposited(amount=n) for n in range(10)])
        for _ in range(100):
            if first.published + second.published >= 10:
                break
            await asyncio.sleep(0.05)
        assert first.leased != second.leased  # one active at a time
        active, standby = (0, 1) if first.leased else (1, 0)
        running[active].cancel()  # stops (and gives its lease back)
        await asyncio.gather(running[active], return_exceptions=True)
        await store.append("a-1", [Deposited(amount=n) for n in range(10, 20)])
        relays = (first, second)
        for _ in range(100):
            if relays[standby].published >= 10 and await relays[standby].position() == 2 * 10:
                break
            await asyncio.sleep(0.05)
        assert await relays[standby].position() == 20
        relays[standby].stop()
        await asyncio.wait_for(running[standby], 5)
        got = await _collect(broker, "all", 20)
        assert sorted(d.event.amount for d in got) == list(range(20))  # type: ignore[attr-defined]
