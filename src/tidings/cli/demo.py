"""`tidings demo`: the seed article's account ledger, as an event-sourced, CQRS application.

The logic lives in `tidings.demo.ledger`; this module only picks the store and shows the
result.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.console import Console
from rich.text import Text

from tidings.brokers import open_broker
from tidings.cli import render
from tidings.core.codec import JSONCodec
from tidings.demo.ledger import LEDGER, AccountBalances, LedgerRun, run_ledger
from tidings.demo.orders import ORDERS, OrdersRun, run_orders
from tidings.store import open_store

__all__ = ["app", "demo"]

app = typer.Typer()


@app.command()
def demo(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Write the demo's events and read model to this store (created if missing) "
            "and keep them, e.g. sqlite:///demo.db. Default: a SQLite file in a temporary "
            "folder, deleted afterwards. $TIDINGS_STORE is deliberately not used here.",
        ),
    ] = None,
) -> None:
    """Run the account ledger: an event-sourced `Account`, time travel and a read model.

    Saves the seed's four events through a `Repository` (each append guarded by the version
    it expects), shows a stale writer refused, loads the account as of version 2 (balance =
    100) and now (balance = 120), and queries the `ledger_balances` read model that a
    `ProjectionRunner` keeps, right after waiting for the last write (read-your-writes).
    """
    if store is None:
        with tempfile.TemporaryDirectory(prefix="tidings-demo-") as folder:
            url = "sqlite:///" + quote(str(Path(folder) / "ledger.db"))
            run, persistent = asyncio.run(_run(url))
        where = f"{url} (a temporary file, deleted now that the demo is over)"
    else:
        url = store
        run, persistent = asyncio.run(_run(url))
        where = url
    _show(run, where)
    with tempfile.TemporaryDirectory(prefix="tidings-demo-orders-") as folder:
        _show_orders(asyncio.run(_run_orders(Path(folder))))
    console = Console(highlight=False)
    if store is not None and persistent:
        console.print(Text("The events and the read model stay in the store; to see them again:"))
        console.print(Text(f"  tidings events {run.stream_id} --store {url}"), soft_wrap=True)
        console.print(Text(f"  tidings projections status --store {url}"), soft_wrap=True)
    elif store is not None:
        console.print(Text("This store lived in the demo's memory: its events are gone now."))


async def _run_orders(folder: Path) -> OrdersRun:
    url = "sqlite:///" + quote(str(folder / "orders.db"))
    async with (
        open_store(url, codec=JSONCodec(ORDERS)) as store,
        open_broker("memory://") as broker,
    ):
        return await run_orders(store, broker, folder)


def _show_orders(run: OrdersRun) -> None:
    console = Console(highlight=False)
    console.print()
    console.print(
        Text(
            f"Orders: the order service stored {len(run.placed)} order.placed events; its "
            f"outbox relay published {run.relayed} of them to the 'orders' topic (an event "
            "reaches the broker if and only if it was stored)."
        )
    )
    console.print(
        Text(
            "Event notification: the email service got order.placed with only the order id on "
            f"'order-notifications' and asked the order service for the details "
            f"({run.lookups} lookups; {run.lookups - len(run.emails)} retried while its read "
            "model was behind: eventual consistency):"
        )
    )
    for line in run.emails:
        console.print(Text(f"  email {line}"))
    revenue = ", ".join(f"{who} {cents / 100:.2f} EUR" for who, cents in run.analytics.items())
    console.print(
        Text(
            "Event-carried state transfer: the analytics service got the whole order in "
            f"order.placed and keeps its own copy ({run.copies} orders, behind an inbox); "
            f"revenue by customer from that copy: {revenue}"
        )
    )


async def _run(url: str) -> tuple[LedgerRun, bool]:
    async with open_store(url, codec=JSONCodec(LEDGER)) as store:
        run = await run_ledger(store)
    return run, bool(getattr(store, "shared_across_processes", True))


def _show(run: LedgerRun, where: str) -> None:
    console = Console(highlight=False)
    console.print(Text(f"Store: {where}"))
    console.print(
        Text(
            f"Wrote 4 events to stream {run.stream_id} through Repository(Account): each save "
            "named the version it expected (NO_STREAM, then 1, 2, 3)."
        )
    )
    if run.refusal is not None:
        console.print(
            Text(
                f"Optimistic concurrency: a second writer loaded the account at version "
                f"{run.refusal.expected} (balance {run.balance_at_2}) and tried to withdraw all "
                f"of it; its save was refused (the stream is at version {run.refusal.actual}); "
                "nothing was written."
            )
        )
    console.print(render.ledger_table(run.stream_id, run.steps))
    console.print(
        Text(
            f"Time travel: repo.get({run.account_id!r}, version=2) -> "
            f"balance as of version 2 = {run.balance_at_2}"
        )
    )
    console.print(Text(f"Current state: balance = {run.balance}", style="bold green"))
    console.print(
        Text(
            f"Read model (CQRS): after runner.wait_for({run.position}), "
            f"{AccountBalances.name}[{run.stream_id!r}] = {json.dumps(run.read_model)}"
        )
    )
