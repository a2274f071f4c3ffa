"""Step 3, commands: the order service takes the first orders through its `CommandBus`
(`_place` serves step 9 too)."""

from __future__ import annotations

from rich.console import Console

from tidings.app.commands import CommandBus
from tidings.demo.orders import PlaceOrder
from tidings.demo.tour.common import CUSTOMERS, FIRST_ORDERS, Tour, _chapter, _correlation, _say


async def take_orders(bus: CommandBus, run: str, tour: Tour, out: Console) -> None:
    _chapter(out, "3. Commands: the order service takes orders")
    for number, (customer, items) in enumerate(FIRST_ORDERS, start=1):
        await _place(bus, f"o-{run}-{number}", customer, items, tour, out)


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
