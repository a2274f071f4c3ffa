"""`tidings relay`: publish the store's events to a broker, from a checkpoint, under a lease.

Run one per store (or several: they take turns through a lease, and another takes over
within about 1.3 x `--lease` when the active one dies). Events need no classes here: they go
out as stored, each under its own id.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from tidings.app.outbox import OutboxRelay, Route, routes
from tidings.brokers import open_broker
from tidings.cli.brokers import BrokerOption
from tidings.cli.store import DEFAULT_STORE, StoreOption
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.core.events import TypeRegistry
from tidings.store import open_store

__all__ = ["app", "relay"]

app = typer.Typer()


@app.command()
def relay(
    broker: BrokerOption,
    route: Annotated[
        list[str] | None,
        typer.Option(
            "--route",
            metavar="PATTERN=TOPIC",
            help="Where events go, first match wins: an event type pattern "
            "(order.placed, order.*, *) or a stream category (category:account) = a topic. "
            "Repeat for more rules; events matching none go to --topic, or nowhere.",
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(metavar="TOPIC", help="Where events matching no --route go."),
    ] = None,
    store: StoreOption = DEFAULT_STORE,
    name: Annotated[
        str,
        typer.Option(
            help="The relay's checkpoint and lease name (relays of one name share the work)."
        ),
    ] = "default",
    lease: Annotated[
        float, typer.Option(help="Seconds the lease lasts; renewed every third of it.")
    ] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Events published per checkpoint.")] = 500,
    once: Annotated[
        bool, typer.Option("--once", help="Publish what is stored now, then exit.")
    ] = False,
) -> None:
    """Relay stored events to --broker until SIGINT or SIGTERM (the transactional outbox).

    An event reaches the broker if and only if it was stored; the checkpoint moves only
    after the broker confirmed, so a relay killed at any moment loses nothing (the last
    batch may go out twice, under the same ids).
    """
    rules = [*(route or []), *([f"*={topic}"] if topic else [])]
    if not rules:
        raise ConfigurationError("give at least one --route PATTERN=TOPIC, or --topic TOPIC")
    rule = routes(rules)
    asyncio.run(_relay(store, broker, rule, name, lease, batch_size, once))


async def _relay(
    store_url: str,
    broker_url: str,
    rule: Route,
    name: str,
    lease: float,
    batch_size: int,
    once: bool,
) -> None:
    codec = JSONCodec(TypeRegistry(), keep_unknown=True)  # relay as stored: no classes needed
    async with (
        open_store(store_url, codec=codec, create=False) as opened,
        open_broker(broker_url) as broker,
    ):
        relay = OutboxRelay(opened, broker, rule, name=name, lease=lease, batch_size=batch_size)
        if once:
            position = await relay.catch_up()
            print(f"relay {name}: published {relay.published} events, at {position}", flush=True)
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, relay.stop)
        print(f"relay {name} ({relay.owner}): from position {await relay.position()}", flush=True)
        await relay.run()
        print(f"relay {name}: stopped at {await relay.position()}", flush=True)
