"""`tidings demo`: the seed article's patterns, one after the other, on one store.

The story lives in `tidings.demo.tour`; this module only picks the store and the broker and
says where the data went.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.console import Console
from rich.text import Text

from tidings.demo.tour import Tour, run_tour

__all__ = ["app", "demo"]

app = typer.Typer()


@app.command()
def demo(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Write the demo's events and read models to this store (created if "
            "missing) and keep them, e.g. sqlite:///demo.db or postgresql://localhost/test. "
            "Default: a SQLite file in a temporary folder, deleted afterwards. "
            "$TIDINGS_STORE is deliberately not used here.",
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            metavar="URL",
            help="Run the email and analytics services as worker processes of their own, "
            "talking over this broker: redis://127.0.0.1:6379, "
            "amqp://guest:guest@127.0.0.1:5672/ or nats://127.0.0.1:4222. Default: both run "
            "in this process on the in-memory broker. Topics get a per-run prefix "
            "(tidings-demo-XXXX.), so runs never meet.",
        ),
    ] = None,
    console: Annotated[
        bool,
        typer.Option(
            "--console",
            help="When the story is told, serve the web console on the demo's store "
            "(http://127.0.0.1:8765/) until Ctrl-C.",
        ),
    ] = False,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="The console's port (with --console).")
    ] = 8765,
) -> None:
    """Tour every pattern of the seed article in about ten seconds, on SQLite, no server.

    1 event sourcing (the ledger: replay to 120, time travel, a refused stale writer,
    snapshots, a read model); 2 schema evolution (an order.placed v1 read as v2);
    3 commands; 4 the outbox relay; 5 event notification (email); 6 event-carried state
    transfer (analytics); 7 a process manager (payment, shipping, refund); 8 CQRS read
    models; 9 temporal decoupling (analytics stops and catches up); 10 the causation tree
    of one order (`tidings trace`).
    """
    out = Console(highlight=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tidings-demo-") as folder:
        url = store or "sqlite:///" + quote(str(Path(folder) / "demo.db"))
        tour = asyncio.run(run_tour(url, Path(folder), out, broker_url=broker))
        kept = store is not None and not store.startswith("memory:")
        _closing(out, tour, kept, time.perf_counter() - started)
        if console and (kept or store is None):
            _serve_console(url, port, out)
        elif console:
            out.print(Text("--console needs a store that outlives the demo, not memory://."))


def _closing(out: Console, tour: Tour, kept: bool, seconds: float) -> None:
    out.print()
    out.print(Text(f"Told in {seconds:.1f} s.", style="dim"))
    if kept:
        out.print(Text("The events and read models stay in the store; to look again:"))
        for line in (
            f"tidings streams --store {tour.store}",
            f"tidings trace {tour.traced} --store {tour.store}",
            f"tidings projections status --store {tour.store}",
            f"tidings console --store {tour.store} --app tidings.demo.orders",
        ):
            out.print(Text(f"  {line}"), soft_wrap=True)
    elif tour.store.startswith("memory:"):
        out.print(Text("This store lived in the demo's memory: its events are gone now."))


def _serve_console(url: str, port: int, out: Console) -> None:
    from tidings.cli.console import console as serve

    out.print()
    out.print(Text("The console on the demo's store (Ctrl-C to stop):", style="bold"))
    serve(store=[url], broker=None, app_path="tidings.demo.orders", port=port)
