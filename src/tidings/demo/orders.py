"""The demo's order service: commands, an event-sourced `Order`, read models and a saga.

- Write side: `PlaceOrder`, `TakePayment`, `ShipOrder`, `RefundPayment` and `CancelOrder`
  go through a `CommandBus` (`HANDLERS`) to the `Order` aggregate, whose events are the
  facts: `order.placed`, `order.payment_taken`, `order.shipped`, ...
- Read side (CQRS): `OrderDetails` (one document per order, for "what is in order 42?") and
  `OrdersByCustomer` (one document per customer), kept by a `ProjectionRunner`.
- Process manager: `OrderFulfilment` takes the payment when an order is placed, then ships
  it; when shipping fails (an item out of stock) it refunds the payment and cancels the
  order: a compensation, since there is no transaction across the steps.
- Schema evolution: `order.placed` is at version 2 (`total_cents`); the version 1 events an
  earlier release stored (a `total` in EUR, as text) are read through `placed_v1_to_v2`.
- Event notification: `OrderPlacedNotice` is the id-only `order.placed` the email service
  reads (its own registry, `NOTIFICATIONS`): the order service's full event is not its
  contract.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field

from tidings.app.aggregate import Aggregate
from tidings.app.commands import Command, CommandContext, handles
from tidings.app.handlers import on
from tidings.app.process import ProcessManager, reacts_to
from tidings.app.projections import Projection
from tidings.core.events import Event, TypeRegistry
from tidings.core.recorded import RecordedEvent
from tidings.core.upcasting import upcaster

__all__ = [
    "HANDLERS",
    "IN_STOCK",
    "NOTIFICATIONS",
    "ORDERS",
    "CancelOrder",
    "Order",
    "OrderCancelled",
    "OrderDetails",
    "OrderFulfilment",
    "OrderPlaced",
    "OrderPlacedNotice",
    "OrderShipped",
    "OrdersByCustomer",
    "PaymentRefunded",
    "PaymentTaken",
    "PlaceOrder",
    "RefundPayment",
    "ShipOrder",
    "ShippingFailed",
    "TakePayment",
    "euros",
    "placed_v1_to_v2",
]

ORDERS = TypeRegistry()
"""The order service's events (and the analytics service's copy of the contract)."""
NOTIFICATIONS = TypeRegistry()
"""The notification contract the email service reads: an id and nothing more."""

IN_STOCK = frozenset({"keyboard", "cable", "monitor", "mouse", "lamp", "desk"})
"""What the warehouse can ship; an order with anything else is refunded and cancelled."""


def euros(cents: int) -> str:
    """`13500` -> `"135.00 EUR"`."""
    return f"{cents / 100:.2f} EUR"


# -- events: the facts ----------------------------------------------------------------------


class OrderPlaced(Event, type="order.placed", version=2, registry=ORDERS):
    """An order was placed: everything about it (event-carried state transfer)."""

    order_id: str
    customer: str
    email: str
    items: list[str]
    total_cents: int


@upcaster("order.placed", from_version=1, registry=ORDERS)
def placed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 stored `total` as EUR text ("42.50"); version 2 stores whole cents."""
    rest = {key: value for key, value in data.items() if key != "total"}
    return {**rest, "total_cents": int(Decimal(data["total"]) * 100)}


class PaymentTaken(Event, type="order.payment_taken", registry=ORDERS):
    """The customer paid."""

    order_id: str
    amount_cents: int


class OrderShipped(Event, type="order.shipped", registry=ORDERS):
    """The order left the warehouse."""

    order_id: str


class ShippingFailed(Event, type="order.shipping_failed", registry=ORDERS):
    """The warehouse could not ship the order."""

    order_id: str
    reason: str


class PaymentRefunded(Event, type="order.payment_refunded", registry=ORDERS):
    """The payment went back to the customer."""

    order_id: str
    amount_cents: int


class OrderCancelled(Event, type="order.cancelled", registry=ORDERS):
    """The order will not be delivered."""

    order_id: str
    reason: str


class OrderPlacedNotice(Event, type="order.placed", registry=NOTIFICATIONS):
    """An order was placed: its id only (event notification); ask the order service."""

    order_id: str


# -- the write side -------------------------------------------------------------------------


class Order(Aggregate, category="order"):
    """An order; its state is the fold of its events (stream `order-<id>`)."""

    status: str = "new"
    total_cents: int = 0
    paid_cents: int = 0

    @classmethod
    def place(cls, order_id: str, customer: str, email: str, items: dict[str, int]) -> Order:
        """A new order of `items` (name -> price in cents)."""
        order = cls(order_id)
        order.record(
            OrderPlaced(
                order_id=order_id,
                customer=customer,
                email=email,
                items=list(items),
                total_cents=sum(items.values()),
            )
        )
        return order

    @on(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.status, self.total_cents = "placed", event.total_cents

    @on(PaymentTaken)
    def _paid(self, event: PaymentTaken) -> None:
        self.status, self.paid_cents = "paid", self.paid_cents + event.amount_cents

    @on(OrderShipped)
    def _shipped(self, event: OrderShipped) -> None:
        self.status = "shipped"

    @on(ShippingFailed)
    def _failed(self, event: ShippingFailed) -> None:
        self.status = "shipping failed"

    @on(PaymentRefunded)
    def _refunded(self, event: PaymentRefunded) -> None:
        self.paid_cents -= event.amount_cents

    @on(OrderCancelled)
    def _cancelled(self, event: OrderCancelled) -> None:
        self.status = "cancelled"


class PlaceOrder(Command):
    """Place an order of `items` (name -> price in cents)."""

    order_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    customer: str = Field(min_length=1)
    email: str = Field(min_length=3)
    items: dict[str, Annotated[int, Field(ge=0)]] = Field(min_length=1)


class TakePayment(Command):
    """Charge the customer for the order."""

    order_id: str
    amount_cents: int


class ShipOrder(Command):
    """Send the order out of the warehouse."""

    order_id: str
    items: list[str]


class RefundPayment(Command):
    """Give the customer's money back."""

    order_id: str
    amount_cents: int


class CancelOrder(Command):
    """Call the order off."""

    order_id: str
    reason: str


@handles(PlaceOrder)
async def place_order(command: PlaceOrder, ctx: CommandContext) -> int:
    """Store a new `Order`; returns the position of its `order.placed` event."""
    order = Order.place(command.order_id, command.customer, command.email, command.items)
    result = await ctx.repository(Order).save(order)
    assert result is not None  # a new order always has an event to save
    return result.position


@handles(TakePayment)
async def take_payment(command: TakePayment, ctx: CommandContext) -> None:
    """Record the payment once (a repeated command finds the order paid and does nothing)."""

    def pay(order: Order) -> None:
        if order.status == "placed":
            order.record(PaymentTaken(order_id=order.id, amount_cents=command.amount_cents))

    await ctx.repository(Order).update(command.order_id, pay)


@handles(ShipOrder)
async def ship_order(command: ShipOrder, ctx: CommandContext) -> None:
    """Ship a paid order, or record why the warehouse could not."""

    def ship(order: Order) -> None:
        if order.status != "paid":
            return
        missing = sorted(set(command.items) - IN_STOCK)
        if missing:
            reason = f"out of stock: {', '.join(missing)}"
            order.record(ShippingFailed(order_id=order.id, reason=reason))
        else:
            order.record(OrderShipped(order_id=order.id))

    await ctx.repository(Order).update(command.order_id, ship)


@handles(RefundPayment)
async def refund_payment(command: RefundPayment, ctx: CommandContext) -> None:
    """Pay back what was paid, once."""

    def refund(order: Order) -> None:
        if order.paid_cents >= command.amount_cents > 0:
            order.record(PaymentRefunded(order_id=order.id, amount_cents=command.amount_cents))

    await ctx.repository(Order).update(command.order_id, refund)


@handles(CancelOrder)
async def cancel_order(command: CancelOrder, ctx: CommandContext) -> None:
    """Cancel the order, once."""

    def cancel(order: Order) -> None:
        if order.status != "cancelled":
            order.record(OrderCancelled(order_id=order.id, reason=command.reason))

    await ctx.repository(Order).update(command.order_id, cancel)


HANDLERS = (place_order, take_payment, ship_order, refund_payment, cancel_order)
"""The order service's command handlers, for `CommandBus(store, *HANDLERS)`."""


# -- the process manager: payment, shipping, refund ------------------------------------------


class FulfilmentStarted(Event, type="fulfilment.started", registry=ORDERS):
    """The saga began: it will take the payment."""

    total_cents: int
    items: list[str]


class ShippingRequested(Event, type="fulfilment.shipping_requested", registry=ORDERS):
    """Paid: the saga asked the warehouse to ship."""


class FulfilmentCompleted(Event, type="fulfilment.completed", registry=ORDERS):
    """Shipped: nothing is left to do."""


class CompensationStarted(Event, type="fulfilment.compensating", registry=ORDERS):
    """Shipping failed: the saga undoes the payment."""

    reason: str


class FulfilmentCancelled(Event, type="fulfilment.cancelled", registry=ORDERS):
    """Refunded: the saga cancelled the order."""


class OrderFulfilment(ProcessManager, category="fulfilment"):
    """Payment, then shipping; when shipping fails, refund and cancel (compensation)."""

    correlate_by = "order_id"
    status: str = "new"
    total_cents: int = 0
    items: list[str] = []  # noqa: RUF012 (replaced, never mutated)

    @reacts_to(OrderPlaced)
    def placed(self, event: OrderPlaced) -> None:
        self.record(FulfilmentStarted(total_cents=event.total_cents, items=event.items))
        self.send(TakePayment(order_id=event.order_id, amount_cents=event.total_cents))

    @reacts_to(PaymentTaken)
    def paid(self, event: PaymentTaken) -> None:
        self.record(ShippingRequested())
        self.send(ShipOrder(order_id=event.order_id, items=self.items))

    @reacts_to(OrderShipped)
    def shipped(self, event: OrderShipped) -> None:
        self.record(FulfilmentCompleted())

    @reacts_to(ShippingFailed)
    def shipping_failed(self, event: ShippingFailed) -> None:
        self.record(CompensationStarted(reason=event.reason))
        self.send(RefundPayment(order_id=event.order_id, amount_cents=self.total_cents))

    @reacts_to(PaymentRefunded)
    def refunded(self, event: PaymentRefunded) -> None:
        self.record(FulfilmentCancelled())
        self.send(CancelOrder(order_id=event.order_id, reason="refunded: could not ship"))

    @on(FulfilmentStarted)
    def _started(self, event: FulfilmentStarted) -> None:
        self.status, self.total_cents, self.items = "paying", event.total_cents, event.items

    @on(ShippingRequested)
    def _shipping(self, event: ShippingRequested) -> None:
        self.status = "shipping"

    @on(FulfilmentCompleted)
    def _completed(self, event: FulfilmentCompleted) -> None:
        self.status = "completed"

    @on(CompensationStarted)
    def _compensating(self, event: CompensationStarted) -> None:
        self.status = "refunding"

    @on(FulfilmentCancelled)
    def _cancelled(self, event: FulfilmentCancelled) -> None:
        self.status = "cancelled"


# -- the read side (CQRS) --------------------------------------------------------------------


class OrderDetails(Projection, name="order_details"):
    """The order service's query side: one document per order id, with its status."""

    @on(OrderPlaced)
    def placed(self, event: OrderPlaced, record: RecordedEvent[Any]) -> None:
        self.view.put(event.order_id, {**event.model_dump(mode="json"), "status": "placed"})

    @on(PaymentTaken)
    def paid(self, event: PaymentTaken) -> None:
        self._status(event.order_id, "paid")

    @on(OrderShipped)
    def shipped(self, event: OrderShipped) -> None:
        self._status(event.order_id, "shipped")

    @on(ShippingFailed)
    def failed(self, event: ShippingFailed) -> None:
        self._status(event.order_id, f"shipping failed ({event.reason})")

    @on(PaymentRefunded)
    def refunded(self, event: PaymentRefunded) -> None:
        self._status(event.order_id, "refunded", refunded_cents=event.amount_cents)

    @on(OrderCancelled)
    def cancelled(self, event: OrderCancelled) -> None:
        self._status(event.order_id, "cancelled")

    def _status(self, order_id: str, status: str, **more: Any) -> None:
        document = self.view.get(order_id)
        if document is not None:
            self.view.put(order_id, {**document, "status": status, **more})


class OrdersByCustomer(Projection, name="orders_by_customer"):
    """A second read model of the same events, shaped for another question: one document per
    customer with their orders and what they spent (refunds deducted)."""

    @on(OrderPlaced)
    def placed(self, event: OrderPlaced) -> None:
        document = self.view.get(event.customer, {"orders": [], "spent_cents": 0})
        if event.order_id not in document["orders"]:
            self.view.put(
                event.customer,
                {
                    "orders": [*document["orders"], event.order_id],
                    "spent_cents": document["spent_cents"] + event.total_cents,
                },
            )
        self.view.put(f"order:{event.order_id}", {"customer": event.customer})

    @on(PaymentRefunded)
    def refunded(self, event: PaymentRefunded) -> None:
        owner = self.view.get(f"order:{event.order_id}")
        if owner is None:
            return
        document = self.view.get(owner["customer"])
        self.view.put(
            owner["customer"],
            {**document, "spent_cents": document["spent_cents"] - event.amount_cents},
        )
