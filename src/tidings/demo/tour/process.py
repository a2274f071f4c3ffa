"""Step 7, a process manager: `OrderFulfilment` takes payment and ships each order, and
refunds and cancels the one the warehouse cannot ship."""

from __future__ import annotations

from rich.console import Console

from tidings.app.projections import ReadModel
from tidings.app.runner import ProjectionRunner
from tidings.demo.orders import euros
from tidings.demo.tour.common import WAIT, Tour, _chapter, _say, _until
from tidings.store import EventStore


async def process_manager(
    store: EventStore, runner: ProjectionRunner, details: ReadModel, tour: Tour, out: Console
) -> None:
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
