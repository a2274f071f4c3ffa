"""`tidings console`: the web console, served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Annotated

import typer

from tidings.cli.store import DEFAULT_STORE, store_option
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError

__all__ = ["app", "console"]

app = typer.Typer()


@app.command()
def console(
    store: Annotated[
        list[str] | None,
        store_option(
            "An event store to show; repeat it to show several (switch between them at "
            "the top of the page). Never created: a missing file is an error. "
            f"Default: {DEFAULT_STORE}."
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="A broker whose dead letters to list, inspect and replay, e.g. "
            "redis://localhost:6379. Without it the dead-letter pages say so.",
        ),
    ] = None,
    app_path: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE",
            help="Your application's module, as `tidings worker --app` takes it: its "
            "projections can then be rebuilt from the console, its Aggregate classes show "
            "their real state in time travel, and its services' consumer groups are listed.",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="The address to listen on. Keep 127.0.0.1 unless you put an authenticating "
            "proxy in front: the pages show every event in the store."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="The port to listen on.")] = 8765,
) -> None:
    """Browse the event store in a web browser: streams, the live log, time travel,
    projections, dead letters and correlation traces.

    Prints the address to open and a token. Reading needs nothing more; the actions that
    change state (rebuilding a projection, replaying a dead letter) ask for the token, so
    another local program or web page cannot trigger them. Event data is always shown as
    text, and the pages load nothing from the internet.

    Keys: / search, j/k move, Enter open, g then s/l/p/d/c/t to go to a page, ? help.
    Stop it with Ctrl-C.
    """
    missing = [m for m in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigurationError(
            f'the console needs {", ".join(missing)}: pip install "tidings[console]"'
        )
    import uvicorn

    from tidings.brokers import open_broker
    from tidings.console.app import create_app, new_token, redact_url
    from tidings.console.parts import AppParts, load_app
    from tidings.store import open_store

    urls = store or [DEFAULT_STORE]
    parts = load_app(app_path) if app_path else AppParts()
    codec = JSONCodec(parts.registry(), keep_unknown=True)
    asyncio.run(_check(urls, codec, broker))  # a missing store is one `error:` line, not a trace
    stores = {redact_url(url): open_store(url, codec=codec, create=False) for url in urls}
    opened_broker = open_broker(broker) if broker else None
    token = new_token()
    web = create_app(
        stores,
        opened_broker,
        token,
        parts,
        broker_label=redact_url(broker) if broker else "",
        allowed_hosts=[host],
    )
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"tidings console: http://{shown}:{port}/")
    typer.echo(f"token for rebuild and replay: {token}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}, not only on this machine", err=True)
    uvicorn.run(web, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


async def _check(urls: list[str], codec: JSONCodec, broker: str | None) -> None:
    """Open and close each store and the broker once, so a bad URL fails before serving."""
    from tidings.brokers import open_broker
    from tidings.store import open_store

    for url in urls:
        async with open_store(url, codec=codec, create=False):
            pass
    if broker:
        async with open_broker(broker):
            pass
