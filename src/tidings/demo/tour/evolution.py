"""Step 2, schema evolution: an order stored as the previous release wrote it
(`order.placed` v1), read back as v2 through the upcaster."""

from __future__ import annotations

import json

from rich.console import Console

from tidings.app.repository import Repository
from tidings.core.events import UnknownEvent
from tidings.demo.orders import Order
from tidings.demo.tour.common import CUSTOMERS, Tour, _say
from tidings.store import NO_STREAM, EventStore


async def _legacy_order(store: EventStore, order_id: str, tour: Tour, out: Console) -> None:
    data = {
        "order_id": order_id,
        "customer": "grace",
        "email": CUSTOMERS["grace"],
        "items": ["cable"],
        "total": "42.50",
    }
    old = UnknownEvent(type="order.placed", version=1, data=data)  # as the old code wrote it
    orders = Repository(store, Order)
    await store.append(orders.stream_id(order_id), [old], expected_version=NO_STREAM)
    _say(
        out,
        f"The previous release stored order {order_id} as order.placed version 1, with the "
        f"total as EUR text: {json.dumps(data)}",
    )
    order = await orders.get(order_id)
    tour.legacy_total_cents = order.total_cents
    _say(
        out,
        "This release's OrderPlaced is version 2 (total_cents). The stored row is never "
        "rewritten; the upcaster placed_v1_to_v2 runs on each read, so the aggregate, the read "
        f"models, the relay and the consumers all see version 2: total_cents = "
        f"{order.total_cents}. The relay below publishes it as version 2 too.",
    )
