"""`tidings demo`: the seed article's account ledger, written and replayed on a real store.

The logic lives in `tidings.demo.ledger`; this module only picks the store and shows the
result.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import typer
from rich.console import Console
from rich.text import Text

from tidings.cli import render
from tidings.core.codec import JSONCodec
from tidings.core.errors import WrongExpectedVersion
from tidings.demo.ledger import (
    LEDGER,
    LedgerStep,
    balance_at,
    open_account,
    replay,
    stale_withdrawal,
)
from tidings.store import open_store

__all__ = ["app", "demo"]

app = typer.Typer()


@dataclass(frozen=True, slots=True)
class _LedgerRun:
    stream_id: str
    steps: list[LedgerStep]
    balance_at_2: int
    refusal: WrongExpectedVersion | None
    persistent: bool


@app.command()
def demo(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Write the demo's events to this store (created if missing) and keep them, "
            "e.g. sqlite:///demo.db. Default: a SQLite file in a temporary folder, deleted "
            "afterwards. $TIDINGS_STORE is deliberately not used here.",
        ),
    ] = None,
) -> None:
    """Run the account ledger: store four events, then rebuild the balance from them.

    Shows event sourcing end to end: appends guarded by expected versions, a replay from the
    store, time travel to an earlier version, and the current state (balance = 120).
    """
    if store is None:
        with tempfile.TemporaryDirectory(prefix="tidings-demo-") as folder:
            url = "sqlite:///" + quote(str(Path(folder) / "ledger.db"))
            run = asyncio.run(_run(url))
        where = f"{url} (a temporary file, deleted now that the demo is over)"
    else:
        url = store
        run = asyncio.run(_run(url))
        where = url
    console = Console(highlight=False)
    console.print(Text(f"Store: {where}"))
    console.print(
        Text(
            f"Wrote 4 events to stream {run.stream_id}; each append named the version it expected "
            "(NO_STREAM, then 1, 2, 3)."
        )
    )
    if run.refusal is not None:
        console.print(
            Text(
                f"Optimistic concurrency: a writer that last saw version {run.refusal.expected} "
                f"tried to withdraw 500 and was refused (the stream is at version "
                f"{run.refusal.actual}); nothing was written."
            )
        )
    console.print(render.ledger_table(run.stream_id, run.steps))
    console.print(Text(f"Time travel: balance as of version 2 = {run.balance_at_2}"))
    balance = run.steps[-1].balance if run.steps else 0
    console.print(Text(f"Current state: balance = {balance}", style="bold green"))
    if store is not None and run.persistent:
        console.print(Text("The events stay in the store; to see them again:"))
        console.print(Text(f"  tidings events {run.stream_id} --store {url}"), soft_wrap=True)
    elif store is not None:
        console.print(Text("This store lived in the demo's memory: its events are gone now."))


async def _run(url: str) -> _LedgerRun:
    async with open_store(url, codec=JSONCodec(LEDGER)) as store:
        stream_id = await open_account(store)
        refusal = await stale_withdrawal(store, stream_id, seen_version=2)
        steps = await replay(store, stream_id)
        as_of_2 = await balance_at(store, stream_id, 2)
    persistent = bool(getattr(store, "shared_across_processes", True))
    return _LedgerRun(stream_id, steps, as_of_2, refusal, persistent)
