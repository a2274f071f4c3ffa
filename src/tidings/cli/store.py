"""`tidings streams`, `events` and `tail`: look into an event store from the command line.

Every command opens the store for reading only, with `create=False`, so a
mistyped path is an error instead of a new empty database, and every store decodes with
`JSONCodec(keep_unknown=True)`, so events whose classes this process never imported still
show, as their type and raw data. `events --tag` reads a DCB query (`Query(QueryItem(tags=…))`)
through the store's tag index: it never scans the log.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated, Any

import typer
from rich.console import Console

from tidings.cli import render
from tidings.core.codec import JSONCodec
from tidings.core.query import Query, QueryItem
from tidings.core.recorded import RecordedEvent
from tidings.store import EventStore, open_store

__all__ = [
    "DEFAULT_STORE",
    "app",
    "events",
    "open_for_reading",
    "store_option",
    "streams",
    "tail",
]

DEFAULT_STORE = "sqlite:///./tidings.db"
"""The store the commands read when neither `--store` nor `$TIDINGS_STORE` names one."""

app = typer.Typer()


def store_option(help: str, *, show_envvar: bool = True) -> Any:
    """`--store URL`, read from `$TIDINGS_STORE` when not given: every command's store."""
    return typer.Option(
        "--store", envvar="TIDINGS_STORE", show_envvar=show_envvar, metavar="URL", help=help
    )


StoreOption = Annotated[
    str,
    store_option(
        "The event store to read, e.g. sqlite:///app.db, sqlite:////abs/path.db, "
        "memory://. It is never created: a missing file is an error."
    ),
]
JSONOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object per line (JSON Lines), for scripts."),
]


def open_for_reading(url: str) -> EventStore:
    """The store at `url`, set up to read without creating anything and to show any event.

    Raises `ConfigurationError` for a bad URL; `StoreNotFound` comes when it is opened.
    """
    return open_store(url, codec=JSONCodec(keep_unknown=True), create=False)


def _console() -> Console:
    return Console(highlight=False)


@app.command()
def streams(store: StoreOption = DEFAULT_STORE, as_json: JSONOption = False) -> None:
    """List every stream with its version (its number of events), ordered by stream id.

    Start here to find the stream ids that `tidings events` takes.
    """
    asyncio.run(_streams(store, as_json))


async def _streams(url: str, as_json: bool) -> None:
    async with open_for_reading(url) as store:
        if as_json:
            async for info in store.streams():
                typer.echo(render.json_line(render.stream_dict(info)))
        else:
            found = [info async for info in store.streams()]
            _console().print(render.streams_table(found))


TagOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tag",
        metavar="TAG",
        help="Only events carrying TAG, as their class's tags= declares it, e.g. "
        "--tag course:c1. Repeat it for events carrying every tag given: "
        "--tag course:c1 --tag student:7. Without STREAM it searches every stream, in "
        "the order the events were stored, through the store's tag index.",
    ),
]


@app.command()
def events(
    stream: Annotated[
        str | None,
        typer.Argument(
            metavar="STREAM",
            help="The stream id, as `tidings streams` lists it. Optional with --tag.",
            show_default=False,
        ),
    ] = None,
    tag: TagOption = None,
    store: StoreOption = DEFAULT_STORE,
    as_json: JSONOption = False,
) -> None:
    """Show one stream's events in version order, with their tags, data and metadata.

    A stream is the history of one thing (an account, an order): this is that history.
    With --tag, only the events carrying every tag given: `tidings events --tag course:c1`
    lists them from every stream, `tidings events STREAM --tag course:c1` from one.
    """
    tags = list(dict.fromkeys(tag or ()))
    if any(not t for t in tags):
        raise typer.BadParameter("a tag is a non-empty text", param_hint="'--tag'")
    if stream is None and not tags:
        raise typer.BadParameter(
            "missing: give a stream id, or --tag TAG for the events of every stream carrying TAG",
            param_hint="'STREAM'",
        )
    asyncio.run(_events(store, stream, tags, as_json))


async def _events(url: str, stream_id: str | None, tags: list[str], as_json: bool) -> None:
    async with open_for_reading(url) as store:
        if stream_id is None:
            found = store.read_all(query=Query(QueryItem(tags=tags)))
        elif await store.stream_version(stream_id) == 0:
            typer.echo(render.error_line(f"no stream {stream_id!r} in {url}"), err=True)
            raise typer.Exit(2)
        else:
            found = store.read_stream(stream_id)
        records = (r async for r in found if all(t in r.tags for t in tags))
        if as_json:
            async for record in records:
                typer.echo(render.json_line(render.record_dict(record)))
        else:
            shown = [record async for record in records]
            _console().print(render.events_table(stream_id, shown, tags))


@app.command()
def tail(
    store: StoreOption = DEFAULT_STORE,
    after: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Start after global position N (exclusive); 0 shows the log from the start.",
        ),
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="Stop after N events (default: no limit)."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep running and print new events as they are appended, until Ctrl-C.",
        ),
    ] = False,
    as_json: JSONOption = False,
) -> None:
    """Print the global log, every stream's events in the order they were stored.

    Each line starts with the event's position; pass the last one seen as --after to resume.
    """
    try:
        asyncio.run(_tail(store, after, limit, follow, as_json))
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how --follow ends: a normal exit, not an error.


async def _tail(url: str, after: int, limit: int | None, follow: bool, as_json: bool) -> None:
    console = _console()

    def show(record: RecordedEvent[Any]) -> None:
        if as_json:
            typer.echo(render.json_line(render.record_dict(record)))
        else:
            console.print(render.log_line(record), soft_wrap=True)

    async with open_for_reading(url) as store:
        if not follow:
            async for record in store.read_all(after, limit=limit):
                show(record)
            return

        async def follow_log() -> None:
            shown = 0
            async for record in store.subscribe(after):
                show(record)
                shown += 1
                if limit is not None and shown >= limit:
                    return

        # Ctrl-C through the loop, not as KeyboardInterrupt: asyncio.run's own SIGINT handler
        # cancels between any two bytecodes, which can break a read finishing at that moment.
        following = asyncio.create_task(follow_log())
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, following.cancel)
        try:
            await following
        except asyncio.CancelledError:
            if not following.cancelled():
                raise  # this coroutine itself was cancelled
