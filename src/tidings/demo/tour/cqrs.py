"""Step 8, CQRS: a second read model, orders by customer, read right after the last write
(read-your-writes)."""

from __future__ import annotations

from rich.console import Console

from tidings.app.projections import ReadModel
from tidings.app.runner import ProjectionRunner
from tidings.demo.orders import OrdersByCustomer, euros
from tidings.demo.tour.common import FIRST_ORDERS, Tour, _chapter, _say
from tidings.store import EventStore


async def cqrs(store: EventStore, runner: ProjectionRunner, tour: Tour, out: Console) -> None:
    _chapter(out, "8. CQRS: one write model, read models shaped for each question")
    head = await store.last_position()
    await runner.wait_for(head)
    customers = ReadModel(store, OrdersByCustomer)
    for customer in sorted({c for c, _ in FIRST_ORDERS} | {"grace"}):
        document = await customers.get(customer)
        if document is not None:
            tour.by_customer[customer] = document
            _say(
                out,
                f"  orders_by_customer[{customer!r}]: {len(document['orders'])} orders, "
                f"spent {euros(document['spent_cents'])}",
            )
    _say(
        out,
        f"Read right after runner.wait_for({head}): the position of the last write, so "
        "the query sees it (read-your-writes) while the read side stays eventually "
        "consistent for everyone else.",
    )
