"""`tidings.integrations.fastapi` and the demo's order service over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI

import tidings
from tidings.demo.http import create_app
from tidings.demo.orders import ORDERS, Order, OrderDetails, OrderPlaced
from tidings.integrations.fastapi import (
    Runner,
    Store,
    Tidings,
    get_repository,
)

ORDER = {
    "order_id": "o-1",
    "customer": "ada",
    "email": "ada@example.com",
    "items": {"keyboard": 8900, "cable": 1200},
}


def _others() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan (ASGITransport does not) and a client on it."""
    before = _others()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c
    assert _others() - before == set(), "the lifespan left tasks running"


async def test_post_then_read_your_write(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'orders.db'}")
    async with serve(app) as client:
        placed = await client.post("/orders", json=ORDER)
        assert placed.status_code == 201, placed.text
        body = placed.json()
        assert body["order_id"] == "o-1"
        assert body["position"] >= 1
        got = await client.get("/orders/o-1", params={"after": body["position"]})
        assert got.status_code == 200, got.text
        assert got.json() == {
            "order_id": "o-1",
            "customer": "ada",
            "email": "ada@example.com",
            "items": ["keyboard", "cable"],
            "total_cents": 10100,
            "status": "placed",
        }
        again = await client.post("/orders", json=ORDER)
        assert again.status_code == 409


async def test_unknown_order_is_404_and_bad_bodies_422(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'orders.db'}")
    async with serve(app) as client:
        assert (await client.get("/orders/nope")).status_code == 404
        assert (await client.get("/orders/nope", params={"after": -1})).status_code == 422
        for bad in (
            {k: v for k, v in ORDER.items() if k != "email"},
            {**ORDER, "items": {"keyboard": "cheap"}},
            {**ORDER, "items": {}},
            {**ORDER, "extra": 1},
        ):
            response = await client.post("/orders", json=bad)
            assert response.status_code == 422, (bad, response.text)
        assert (await client.post("/orders", content=b"not json")).status_code == 422


async def test_the_store_outlives_one_lifespan(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'orders.db'}")
    async with serve(app) as client:
        position = (await client.post("/orders", json=ORDER)).json()["position"]
    async with serve(app) as client:  # a restart: a new store on the same file
        got = await client.get("/orders/o-1", params={"after": position})
        assert got.json()["total_cents"] == 10100


async def test_lifespan_runs_relay_and_services_and_stops_them(tmp_path: Path) -> None:
    received: list[OrderPlaced] = []
    arrived = asyncio.Event()

    def audit(broker: tidings.Broker) -> tidings.Service:
        service = tidings.Service("audit", broker, registry=ORDERS)  # type: ignore[arg-type]

        @service.handler("orders")
        async def seen(event: OrderPlaced) -> None:
            received.append(event)
            arrived.set()

        return service

    setup = Tidings(
        f"sqlite:///{tmp_path / 'orders.db'}",
        codec=tidings.JSONCodec(ORDERS),
        broker="memory://",
        projections=[OrderDetails()],
        services=[audit],
        relay={"order.placed": "orders"},
    )
    app = FastAPI(lifespan=setup.lifespan)

    @app.post("/orders/{order_id}")
    async def place(
        order_id: str,
        repo: Annotated[tidings.Repository[Order], Depends(get_repository(Order))],
        runner: Runner,
        store: Store,
    ) -> dict[str, object]:
        result = await repo.save(Order.place(order_id, "ann", "ann@example.com", {"pen": 150}))
        assert result is not None
        await runner.wait_for(result.position)
        return {"details": await tidings.ReadModel(store, OrderDetails).get(order_id)}

    async with serve(app) as client:
        await setup.broker.declare("orders", "audit")
        response = await client.post("/orders/o-9")
        assert response.json()["details"]["total_cents"] == 150
        async with asyncio.timeout(10):
            await arrived.wait()
        assert [event.order_id for event in received] == ["o-9"]
        assert setup.relay is not None
        assert [service.name for service in setup.services] == ["audit"]
    assert setup.services == [] and setup.relay is None
    with pytest.raises(tidings.ConfigurationError):
        setup.store  # noqa: B018 - not running any more


def test_configuration_errors() -> None:
    with pytest.raises(tidings.ConfigurationError, match="need a broker"):
        Tidings("memory://", relay="orders")


def test_importing_tidings_does_not_import_fastapi() -> None:
    code = "import sys, tidings; print('fastapi' in sys.modules, 'starlette' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
