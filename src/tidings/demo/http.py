"""The demo's order service over HTTP, with `tidings.integrations.fastapi`.

`POST /orders` places an order (the `PlaceOrder` command, through the `CommandBus`) and
answers with the position of the stored event; `GET /orders/{order_id}?after=POSITION` waits
until the `order_details` read model has applied that position (read-your-writes), then
answers with the order's document.

    uvicorn --factory tidings.demo.http:create_app    # TIDINGS_STORE=sqlite:///orders.db
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, status
from pydantic import BaseModel

from tidings.app.projections import ReadModel
from tidings.core.codec import JSONCodec
from tidings.core.errors import WrongExpectedVersion
from tidings.demo.orders import ORDERS, OrderDetails, PlaceOrder, place_order
from tidings.integrations.fastapi import Bus, Runner, Tidings, get_read_model

__all__ = ["OrderPlacedResponse", "create_app"]

READ_TIMEOUT = 5.0
"""Seconds `GET /orders/{id}?after=` waits for the read model before answering 503."""


class OrderPlacedResponse(BaseModel):
    """Where the order's event went: wait for `position` to read it back."""

    order_id: str
    position: int


Details = Annotated[ReadModel, Depends(get_read_model(OrderDetails))]


def create_app(store: str | None = None, *, broker: str | None = None) -> FastAPI:
    """The order service's app on `store` (default: `$TIDINGS_STORE`, else
    `sqlite:///orders.db`); with a `broker`, its outbox relay publishes to `orders`."""
    tidings = Tidings(
        store or os.environ.get("TIDINGS_STORE", "sqlite:///orders.db"),
        codec=JSONCodec(ORDERS),
        broker=broker,
        projections=[OrderDetails()],
        handlers=[place_order],
        relay={"order.placed": "orders"} if broker else None,
        relay_name="orders",
    )
    app = FastAPI(title="tidings demo: orders", lifespan=tidings.lifespan)

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def post_order(command: PlaceOrder, bus: Bus) -> OrderPlacedResponse:
        """Place an order; `position` is what to pass as `after=` to read it back."""
        try:
            position = await bus.dispatch(command)
        except WrongExpectedVersion:
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"order {command.order_id} already exists"
            ) from None
        return OrderPlacedResponse(order_id=command.order_id, position=position)

    @app.get("/orders/{order_id}")
    async def get_order(
        order_id: str,
        runner: Runner,
        details: Details,
        after: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """The order's details, once the read model has applied position `after`."""
        if after:
            try:
                await runner.wait_for(after, timeout=READ_TIMEOUT)
            except TimeoutError:
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"the read model has not reached position {after} yet; retry",
                ) from None
        document = await details.get(order_id)
        if document is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order {order_id}")
        return dict(document)

    return app
