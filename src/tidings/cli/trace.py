"""`tidings trace CORRELATION_ID`: the causation tree of one request, across stores.

Each line is one step: a command (known by the events it caused; commands are not stored)
or a stored event, with who wrote it (`origin`), its stream and version, its time, and how
long after its cause it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

import typer
from rich.console import Console

from tidings.app.trace import TraceStep, causation_tree
from tidings.cli import render
from tidings.cli.store import DEFAULT_STORE, open_for_reading, store_option

__all__ = ["app", "trace"]

app = typer.Typer()


@app.command()
def trace(
    correlation_id: Annotated[str, typer.Argument(metavar="CORRELATION_ID")],
    store: Annotated[
        list[str] | None,
        store_option(
            "A store to gather the events from; repeat it for every service's store. "
            f"Default: $TIDINGS_STORE, else {DEFAULT_STORE}.",
            show_envvar=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the tree as one JSON document, for tools.")
    ] = False,
) -> None:
    """Print the causation tree of CORRELATION_ID: which command or event caused which.

    Every event appended or published inside a command, a handled message or
    `tidings.correlate(...)` carries that correlation id; the id is in every event's
    metadata (`tidings events STREAM --json`). Exits 1 when no store has an event of it.
    """
    urls = store or [DEFAULT_STORE]
    roots = asyncio.run(_gather(urls, correlation_id))
    if as_json:
        typer.echo(
            json.dumps({"correlation_id": correlation_id, "steps": [r.to_dict() for r in roots]})
        )
    else:
        console = Console(highlight=False)
        console.print(render.trace_tree(correlation_id, roots, show_store=len(urls) > 1))
    if not roots:
        typer.echo(f"no events of correlation {correlation_id!r} in {', '.join(urls)}", err=True)
        raise typer.Exit(1)


async def _gather(urls: list[str], correlation_id: str) -> list[TraceStep]:
    async with contextlib.AsyncExitStack() as stack:
        stores = []
        for url in urls:
            stores.append(await stack.enter_async_context(open_for_reading(url)))
        return await causation_tree(stores, correlation_id, names=urls)
