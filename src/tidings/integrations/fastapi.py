"""FastAPI integration (`pip install "tidings[fastapi]"`): a lifespan and dependencies.

`Tidings` holds the configuration; its `lifespan` opens the store (and the broker), runs the
projections, the outbox relay and the services in the background while the app serves, and
stops them in reverse order on shutdown. Endpoints get what they need through dependencies.

```python
tidings = Tidings("sqlite:///orders.db", codec=JSONCodec(ORDERS), projections=[OrderDetails()],
                  handlers=[place_order], broker="memory://", relay={"order.placed": "orders"})
app = FastAPI(lifespan=tidings.lifespan)

@app.post("/orders")
async def place(command: PlaceOrder, bus: Bus) -> dict[str, int]:
    return {"position": await bus.dispatch(command)}   # place_order returns the position

@app.get("/orders/{order_id}")
async def order(order_id: str, runner: Runner, store: Store, after: int = 0) -> Any:
    await runner.wait_for(after, timeout=5)            # read your own write
    return await ReadModel(store, OrderDetails).get(order_id)
```

`Store`, `Bus` and `Runner` are `Annotated` aliases of `get_store`, `get_command_bus` and
`get_runner`; `get_repository(Order)` and `get_read_model(OrderDetails)` build dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request

from tidings.app.aggregate import Aggregate
from tidings.app.commands import CommandBus
from tidings.app.outbox import OutboxRelay, Route
from tidings.app.projections import Projection, ReadModel
from tidings.app.repository import Repository
from tidings.app.runner import ProjectionRunner
from tidings.app.service import Service
from tidings.brokers import open_broker
from tidings.brokers.base import BrokerBase
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.store import EventStore, open_store

__all__ = [
    "Broker",
    "Bus",
    "Runner",
    "Store",
    "Tidings",
    "get_broker",
    "get_command_bus",
    "get_read_model",
    "get_repository",
    "get_runner",
    "get_store",
    "get_tidings",
]

log = logging.getLogger("tidings.integrations.fastapi")

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")
ServiceSpec = Service | Callable[[BrokerBase], Service]
"""A service, or a function building one on the opened broker (for a broker URL)."""


class Tidings:
    """What a FastAPI app runs of tidings, and the running parts while its lifespan lasts.

    Args:
        store: a store URL (a new store each lifespan) or an unopened `EventStore`.
        codec: the codec of a store (and a broker) opened from a URL.
        broker: a broker URL, an unopened broker, or None (no services, no relay).
        projections: projection instances the `ProjectionRunner` keeps up to date.
        handlers: `@handles` functions or objects, registered on the `CommandBus`.
        services: services, or functions `broker -> Service`, each run as a task.
        relay: outbox routes (`{"order.*": "orders"}`, a topic, or a `Route`); None: no relay.
        relay_name: the relay's checkpoint name.
        shutdown_timeout: seconds each service gets to finish in-flight messages.
    """

    def __init__(
        self,
        store: str | EventStore,
        *,
        codec: JSONCodec | None = None,
        broker: str | BrokerBase | None = None,
        projections: Iterable[Projection] = (),
        handlers: Iterable[object] = (),
        services: Iterable[ServiceSpec] = (),
        relay: str | Route | Mapping[str, str] | Iterable[str] | None = None,
        relay_name: str = "default",
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.store_config = store
        self.broker_config = broker
        self.codec = codec
        self.projections = list(projections)
        self.handlers = list(handlers)
        self.service_specs = list(services)
        self.routes = relay
        self.relay_name = relay_name
        self.shutdown_timeout = shutdown_timeout
        if broker is None and (self.service_specs or relay is not None):
            raise ConfigurationError("services and an outbox relay need a broker: broker=URL")
        self._store: EventStore | None = None
        self._broker: BrokerBase | None = None
        self._bus: CommandBus | None = None
        self._runner: ProjectionRunner | None = None
        self.relay: OutboxRelay | None = None
        self.services: list[Service] = []

    # -- the running parts -----------------------------------------------------------------

    @property
    def store(self) -> EventStore:
        """The open store (only while the lifespan runs)."""
        return _running(self._store, "store")

    @property
    def broker(self) -> BrokerBase:
        """The open broker (only while the lifespan runs, and only when configured)."""
        return _running(self._broker, "broker")

    @property
    def bus(self) -> CommandBus:
        """The command bus on the store, with the configured handlers."""
        return _running(self._bus, "command bus")

    @property
    def runner(self) -> ProjectionRunner:
        """The projection runner, for `wait_for` (read-your-writes)."""
        return _running(self._runner, "projection runner")

    # -- lifespan --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Run everything while the app serves: `FastAPI(lifespan=tidings.lifespan)`.

        Starts store, broker, projections, relay, then services; stops them in reverse.
        """
        if self._store is not None:
            raise ConfigurationError("this Tidings is already running (one lifespan at a time)")
        app.state.tidings = self
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._forget)
            store = self.store_config
            if isinstance(store, str):
                store = open_store(store, codec=self.codec) if self.codec else open_store(store)
            await store.open()
            stack.push_async_callback(store.aclose)
            self._store = store
            self._bus = CommandBus(store, *self.handlers)
            if self.broker_config is not None:
                broker = self.broker_config
                if isinstance(broker, str):
                    broker = (
                        open_broker(broker, codec=self.codec) if self.codec else open_broker(broker)
                    )
                await broker.open()
                stack.push_async_callback(broker.aclose)
                self._broker = broker
            self._runner = await stack.enter_async_context(
                ProjectionRunner(store, self.projections)
            )
            if self.routes is not None:
                relay = OutboxRelay(store, self.broker, self.routes, name=self.relay_name)
                self.relay = await stack.enter_async_context(relay)
            self.services = [
                spec if isinstance(spec, Service) else spec(self.broker)
                for spec in self.service_specs
            ]
            if self.services:
                tasks = [
                    asyncio.create_task(service.run(), name=f"tidings service {service.name}")
                    for service in self.services
                ]
                stack.push_async_callback(self._stop_services, tasks)
            yield

    async def _stop_services(self, tasks: list[asyncio.Task[None]]) -> None:
        for service in self.services:
            service.stop()
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await asyncio.wait(tasks)
        except TimeoutError:
            log.warning("services still running after %ss: cancelled", self.shutdown_timeout)
        for task in tasks:
            task.cancel()
        for service, outcome in zip(
            self.services, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, Exception):
                log.error("service %s failed", service.name, exc_info=outcome)

    def _forget(self) -> None:
        self._store = self._broker = self._bus = self._runner = self.relay = None
        self.services = []


def _running(part: T | None, what: str) -> T:
    if part is None:
        raise ConfigurationError(
            f"no {what}: tidings is not running (is `lifespan=tidings.lifespan` set?)"
        )
    return part


# -- dependencies ---------------------------------------------------------------------------


def get_tidings(request: Request) -> Tidings:
    """The app's running `Tidings` (set by its lifespan)."""
    tidings = getattr(request.app.state, "tidings", None)
    if not isinstance(tidings, Tidings):
        raise ConfigurationError("the app has no tidings lifespan: FastAPI(lifespan=...)")
    return tidings


def get_store(request: Request) -> EventStore:
    """Dependency: the open event store."""
    return get_tidings(request).store


def get_broker(request: Request) -> BrokerBase:
    """Dependency: the open broker."""
    return get_tidings(request).broker


def get_command_bus(request: Request) -> CommandBus:
    """Dependency: the command bus with the configured handlers."""
    return get_tidings(request).bus


def get_runner(request: Request) -> ProjectionRunner:
    """Dependency: the projection runner, for `await runner.wait_for(position)`."""
    return get_tidings(request).runner


def get_repository(aggregate: type[A], **options: Any) -> Callable[[Request], Repository[A]]:
    """A dependency handing out the (shared) repository of `aggregate`:
    `repo: Annotated[Repository[Order], Depends(get_repository(Order))]`."""

    def repository(request: Request) -> Repository[A]:
        return get_tidings(request).bus.repository(aggregate, **options)

    return repository


def get_read_model(projection: type[Projection] | str) -> Callable[[Request], ReadModel]:
    """A dependency handing out the `ReadModel` of `projection`."""

    def read_model(request: Request) -> ReadModel:
        return ReadModel(get_tidings(request).store, projection)

    return read_model


Store = Annotated[EventStore, Depends(get_store)]
Broker = Annotated[BrokerBase, Depends(get_broker)]
Bus = Annotated[CommandBus, Depends(get_command_bus)]
Runner = Annotated[ProjectionRunner, Depends(get_runner)]
