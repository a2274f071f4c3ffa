"""The seed's order flow for the process manager tests: placed, paid, shipped, or refunded."""

from __future__ import annotations

from tidings import (
    Aggregate,
    Command,
    CommandContext,
    Event,
    ProcessManager,
    handles,
    on,
    reacts_to,
)

OUT_OF_STOCK: set[str] = set()
"""Orders the shipping service cannot ship (tests add to it)."""


class OrderPlaced(Event, type="test.order.placed"):
    order_id: str
    total: int


class PaymentTaken(Event, type="test.order.payment_taken"):
    order_id: str
    amount: int


class OrderShipped(Event, type="test.order.shipped"):
    order_id: str


class ShippingFailed(Event, type="test.order.shipping_failed"):
    order_id: str
    reason: str


class PaymentRefunded(Event, type="test.order.payment_refunded"):
    order_id: str
    amount: int


class OrderCancelled(Event, type="test.order.cancelled"):
    order_id: str
    reason: str


class Order(Aggregate):
    total: int = 0
    status: str = "new"
    paid: int = 0

    @on(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.total, self.status = event.total, "placed"

    @on(PaymentTaken)
    def _paid(self, event: PaymentTaken) -> None:
        self.paid, self.status = event.amount, "paid"

    @on(OrderShipped)
    def _shipped(self, event: OrderShipped) -> None:
        self.status = "shipped"

    @on(ShippingFailed)
    def _failed(self, event: ShippingFailed) -> None:
        self.status = "shipping_failed"

    @on(PaymentRefunded)
    def _refunded(self, event: PaymentRefunded) -> None:
        self.paid -= event.amount

    @on(OrderCancelled)
    def _cancelled(self, event: OrderCancelled) -> None:
        self.status = "cancelled"


class PlaceOrder(Command):
    order_id: str
    total: int


class TakePayment(Command):
    order_id: str
    amount: int


class ShipOrder(Command):
    order_id: str


class RefundPayment(Command):
    order_id: str
    amount: int


class CancelOrder(Command):
    order_id: str
    reason: str


@handles(PlaceOrder)
async def place_order(command: PlaceOrder, ctx: CommandContext) -> None:
    order = Order(command.order_id)
    order.record(OrderPlaced(order_id=command.order_id, total=command.total))
    await ctx.repository(Order).save(order)


@handles(TakePayment)
async def take_payment(command: TakePayment, ctx: CommandContext) -> None:
    def pay(order: Order) -> None:
        if order.status == "placed":  # a repeated command changes nothing
            order.record(PaymentTaken(order_id=order.id, amount=command.amount))

    await ctx.repository(Order).update(command.order_id, pay)


@handles(ShipOrder)
async def ship_order(command: ShipOrder, ctx: CommandContext) -> None:
    def ship(order: Order) -> None:
        if order.status != "paid":
            return
        if order.id in OUT_OF_STOCK:
            order.record(ShippingFailed(order_id=order.id, reason="out of stock"))
        else:
            order.record(OrderShipped(order_id=order.id))

    await ctx.repository(Order).update(command.order_id, ship)


@handles(RefundPayment)
async def refund_payment(command: RefundPayment, ctx: CommandContext) -> None:
    def refund(order: Order) -> None:
        if order.paid >= command.amount:
            order.record(PaymentRefunded(order_id=order.id, amount=command.amount))

    await ctx.repository(Order).update(command.order_id, refund)


@handles(CancelOrder)
async def cancel_order(command: CancelOrder, ctx: CommandContext) -> None:
    def cancel(order: Order) -> None:
        if order.status != "cancelled":
            order.record(OrderCancelled(order_id=order.id, reason=command.reason))

    await ctx.repository(Order).update(command.order_id, cancel)


HANDLERS = (place_order, take_payment, ship_order, refund_payment, cancel_order)


# -- the process manager's own facts --------------------------------------------------------


class FulfilmentStarted(Event, type="test.fulfilment.started"):
    total: int


class ShippingRequested(Event, type="test.fulfilment.shipping_requested"):
    pass


class FulfilmentCompleted(Event, type="test.fulfilment.completed"):
    pass


class CompensationStarted(Event, type="test.fulfilment.compensating"):
    reason: str


class FulfilmentCancelled(Event, type="test.fulfilment.cancelled"):
    pass


class OrderFulfilment(ProcessManager):
    """Payment, then shipping; when shipping fails, refund and cancel (compensation)."""

    correlate_by = "order_id"
    status: str = "new"
    total: int = 0

    @reacts_to(OrderPlaced)
    def placed(self, event: OrderPlaced) -> None:
        self.record(FulfilmentStarted(total=event.total))
        self.send(TakePayment(order_id=event.order_id, amount=event.total))

    @reacts_to(PaymentTaken)
    def paid(self, event: PaymentTaken) -> None:
        self.record(ShippingRequested())
        self.send(ShipOrder(order_id=event.order_id))

    @reacts_to(OrderShipped)
    def shipped(self, event: OrderShipped) -> None:
        self.record(FulfilmentCompleted())

    @reacts_to(ShippingFailed)
    def shipping_failed(self, event: ShippingFailed) -> None:
        self.record(CompensationStarted(reason=event.reason))
        self.send(RefundPayment(order_id=event.order_id, amount=self.total))

    @reacts_to(PaymentRefunded)
    def refunded(self, event: PaymentRefunded) -> None:
        self.record(FulfilmentCancelled())
        self.send(CancelOrder(order_id=event.order_id, reason="refunded: could not ship"))

    @on(FulfilmentStarted)
    def _started(self, event: FulfilmentStarted) -> None:
        self.status, self.total = "paying", event.total

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
