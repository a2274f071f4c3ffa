"""One command and its event, for tests that follow a request through the layers
(telemetry). The whole order saga is the demo's: `tidings.demo.orders`."""

from __future__ import annotations

from tidings import Aggregate, Command, CommandContext, Event, handles, on


class OrderPlaced(Event, type="test.order.placed"):
    order_id: str
    total: int


class Order(Aggregate):
    total: int = 0

    @on(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.total = event.total


class PlaceOrder(Command):
    order_id: str
    total: int


@handles(PlaceOrder)
async def place_order(command: PlaceOrder, ctx: CommandContext) -> None:
    order = Order(command.order_id)
    order.record(OrderPlaced(order_id=command.order_id, total=command.total))
    await ctx.repository(Order).save(order)
