"""`tidings trace`: one request's causation tree across the stores of two services, from
the command through the outbox and a broker to the consumer's own events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tidings
from tidings import Command, CommandBus, Context, OutboxRelay, Service, open_broker, open_store
from tidings.app.trace import causation_tree
from tidings.cli.main import app


class PlaceOrder(Command):
    order_id: str


class Placed(tidings.Event, type="test.trace.placed"):
    order_id: str


class Invoiced(tidings.Event, type="test.trace.invoiced"):
    order_id: str


async def _one_order(orders_url: str, billing_url: str) -> str:
    async with (
        open_store(orders_url) as orders,
        open_store(billing_url) as billing,
        open_broker("memory://") as broker,
    ):
        bus = CommandBus(orders)

        @bus.handles(PlaceOrder)
        async def place(command: PlaceOrder) -> None:
            await orders.append(f"order-{command.order_id}", [Placed(order_id=command.order_id)])

        service = Service("billing", broker)

        @service.handler("orders")
        async def invoice(event: Placed, ctx: Context) -> None:
            await billing.append(f"invoice-{event.order_id}", [Invoiced(order_id=event.order_id)])
            service.stop()

        await broker.declare("orders", "billing")
        await bus.dispatch(PlaceOrder(order_id="7"), correlation_id="req-7")
        await OutboxRelay(orders, broker, "orders").catch_up()
        await asyncio.wait_for(service.run(), 10)
    return "req-7"


@pytest.fixture
def urls(tmp_path: Path) -> tuple[str, str]:
    orders, billing = f"sqlite:///{tmp_path / 'orders.db'}", f"sqlite:///{tmp_path / 'billing.db'}"
    asyncio.run(_one_order(orders, billing))
    return orders, billing


async def test_the_tree_links_command_event_and_consumer_across_stores(
    urls: tuple[str, str],
) -> None:
    async with open_store(urls[0]) as orders, open_store(urls[1]) as billing:
        [root] = await causation_tree([orders, billing], "req-7", names=list(urls))
    assert (root.kind, root.type, root.origin) == ("command", "PlaceOrder", "command PlaceOrder")
    [placed] = root.children
    assert (placed.type, placed.stream_id, placed.version) == ("test.trace.placed", "order-7", 1)
    assert placed.store == urls[0] and placed.delay == 0.0
    [invoiced] = placed.children
    assert (invoiced.type, invoiced.origin, invoiced.store) == (
        "test.trace.invoiced",
        "service billing",
        urls[1],
    )
    assert invoiced.delay is not None and invoiced.delay >= 0


def test_the_cli_prints_the_tree_and_json_and_exits_1_for_an_unknown_id(
    urls: tuple[str, str],
) -> None:
    runner = CliRunner(env={"COLUMNS": "200", "TIDINGS_STORE": None})
    stores = ["--store", urls[0], "--store", urls[1]]
    result = runner.invoke(app, ["trace", "req-7", *stores])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "correlation req-7" in lines[0]
    assert any("command PlaceOrder" in line for line in lines)
    assert any("test.trace.placed  order-7 v1  by command PlaceOrder" in line for line in lines)
    assert any("test.trace.invoiced  invoice-7 v1  by service billing" in line for line in lines)
    as_json = runner.invoke(app, ["trace", "req-7", "--json", *stores])
    tree = json.loads(as_json.stdout)
    [root] = tree["steps"]
    assert root["children"][0]["children"][0]["type"] == "test.trace.invoiced"
    missing = runner.invoke(app, ["trace", "nobody", *stores])
    assert missing.exit_code == 1 and "no events of correlation 'nobody'" in missing.stderr
