"""The orders demo's event contract, for `tidings schema asyncapi --app
tidings.demo.contracts:ORDERS_CONTRACT`.

The same flows `run_orders` wires up, declared once: the order service's outbox relay sends
the whole `order.placed` to `orders`; the notifier reads it and sends the id-only notice to
`order-notifications`, which the email service reads; analytics keeps its own copy from
`orders`. Each side names the class it builds with, so the two `order.placed` shapes (the
order service's five fields, the notice's one) are two messages.
"""

from __future__ import annotations

from tidings.asyncapi import Contract, ServiceContract
from tidings.demo.orders import OrderPlaced, OrderPlacedNotice

__all__ = ["ORDERS_CONTRACT"]

ORDERS_CONTRACT = Contract(
    "tidings orders demo",
    version="1.0.0",
    description="An event-sourced order service, its outbox relay, and three consumers: "
    "event notification (email) and event-carried state transfer (analytics).",
    services=[
        ServiceContract(
            "orders",
            publishes={"orders": [OrderPlaced]},
            description="The order service: its outbox relay publishes every stored order.",
        ),
        ServiceContract(
            "order-notifier",
            subscribes={"orders": [OrderPlaced]},
            publishes={"order-notifications": [OrderPlacedNotice]},
            description="Announces each order with its id only.",
        ),
        ServiceContract(
            "email",
            subscribes={"order-notifications": [OrderPlacedNotice]},
            description="Mails a confirmation, asking the order service for the details.",
        ),
        ServiceContract(
            "analytics",
            subscribes={"orders": [OrderPlaced]},
            description="Keeps its own copy of every order (behind an inbox).",
        ),
    ],
    topics={
        "orders": "Every order placed, whole: event-carried state transfer.",
        "order-notifications": "That an order was placed, by id: event notification.",
    },
)
