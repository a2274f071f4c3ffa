"""`tidings projections status` and `rebuild`: see and repair the read side of a store.

`status` needs no application code: it reads the checkpoints the store keeps. `rebuild`
imports the application's projections (`--app module[:attribute]`) and refills one of them
from the start of the log, blue/green, while the old read model keeps serving queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC
from typing import Annotated, Any, TypeGuard

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from tidings.app.projections import Projection
from tidings.app.runner import ProjectionRunner, ProjectionStatus, projection_status
from tidings.cli import render
from tidings.cli.loading import import_module
from tidings.cli.store import (
    DEFAULT_STORE,
    JSONOption,
    StoreOption,
    open_for_reading,
    store_option,
)
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError
from tidings.core.events import Event, TypeRegistry
from tidings.store import open_store

__all__ = [
    "app",
    "load_projections",
    "rebuild",
    "registry_for",
    "status",
    "status_dict",
    "status_table",
]

app = typer.Typer(
    name="projections",
    help="See where each projection (read model) stands, and rebuild one from the log.",
    no_args_is_help=True,
)


# -- status ----------------------------------------------------------------------------------


@app.command()
def status(store: StoreOption = DEFAULT_STORE, as_json: JSONOption = False) -> None:
    """One row per projection with a checkpoint in the store (one per segment of a
    projection with segments=), how far behind it is, and which worker holds it.

    Lag counts the events in the log past the projection's position, and the age of the
    oldest of them in seconds. A rebuild in progress shows as `rebuilding: yes`; the owner
    is the `tidings worker` holding the lease (--owner, or host:pid:random). No application
    code is needed.
    """
    asyncio.run(_status(store, as_json))


async def _status(url: str, as_json: bool) -> None:
    async with open_for_reading(url) as opened:
        found = await projection_status(opened)
        head = found[0].head if found else await opened.last_position()
    if as_json:
        for item in found:
            typer.echo(render.json_line(status_dict(item)))
    else:
        Console(highlight=False).print(status_table(found, head))


def status_dict(item: ProjectionStatus) -> dict[str, Any]:
    """One projection's status as a JSON-ready dict: the shape of `status --json` output."""
    return {
        "name": item.name,
        "generation": item.generation,
        "position": item.position,
        "head": item.head,
        "lag_events": item.lag_events,
        "lag_seconds": round(item.lag_seconds, 3),
        "updated_at": item.updated_at.isoformat() if item.updated_at else None,
        "rebuilding": item.rebuilding,
        "segment": item.segment,
        "segments": item.segments,
        "owner": item.owner,
    }


def status_table(statuses: Iterable[ProjectionStatus], head: int) -> Table:
    """Every projection's checkpoint against `head`, the head of the log (the same for every
    row, so it is in the title), with any lag in red."""
    statuses = list(statuses)
    table = render.compact_table(f"projections (head of the log: position {head})", show_edge=False)
    longest = max((len(item.name) for item in statuses), default=10)
    table.add_column("projection", overflow="fold", min_width=min(longest, 24))
    for header in ("gen", "position", "lag\nevents", "lag\n(s)"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("updated at (UTC)")
    table.add_column("rebuilding", no_wrap=True)
    table.add_column("owner", overflow="fold")
    for item in statuses:
        behind = "red" if item.lag_events else ""
        when = "-"
        if item.updated_at is not None:
            when = item.updated_at.astimezone(UTC).isoformat(" ", timespec="seconds")[:19]
        name = (
            item.name if item.segment is None else f"{item.name} [{item.segment}/{item.segments}]"
        )
        table.add_row(
            Text(name),
            Text(str(item.generation)),
            Text(str(item.position)),
            Text(str(item.lag_events), style=behind),
            Text(f"{item.lag_seconds:.1f}", style=behind),
            Text(when),
            Text("yes" if item.rebuilding else "no", style="yellow" if item.rebuilding else ""),
            Text(item.owner or "-", style="" if item.owner else "dim"),
        )
    return table


# -- rebuild ---------------------------------------------------------------------------------


@app.command()
def rebuild(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME", help="The projection's name, as `status` lists it."),
    ],
    app_path: Annotated[
        str,
        typer.Option(
            "--app",
            metavar="MODULE[:ATTRIBUTE]",
            help="Where your projections are. `myapp.projections` takes every Projection "
            "instance, and every Projection class with handlers defined there, at the "
            "module's top level; "
            "`myapp.projections:PROJECTIONS` takes that attribute: a Projection instance or "
            "class, a list of them, or a function of no arguments returning either. Classes "
            "are created with no arguments. The module is imported from the current folder "
            "or $PYTHONPATH.",
        ),
    ],
    store: Annotated[
        str,
        store_option(
            "The event store holding the log and the read model, e.g. sqlite:///app.db. "
            "It is never created: a missing file is an error."
        ),
    ] = DEFAULT_STORE,
) -> None:
    """Rebuild one projection's read model from the start of the log, blue/green.

    A fresh generation of the read model is filled from the first event while the old one
    keeps serving queries; once it has caught up with the head of the log it is swapped in,
    and the old one dropped, in one transaction. Readers never see a half-built model, and a
    rebuild that stops halfway leaves the old model live. Events are decoded with the type
    registries of the classes the projection's handlers name.
    """
    projections = load_projections(app_path)
    chosen = projections.get(name)
    if chosen is None:
        known = ", ".join(sorted(projections)) or "none"
        raise ConfigurationError(f"no projection named {name!r} in {app_path}; known: {known}")
    asyncio.run(_rebuild(store, chosen))


async def _rebuild(url: str, projection: Projection) -> None:
    console = Console(highlight=False)
    codec = JSONCodec(registry_for(projection), keep_unknown=True)
    async with open_store(url, codec=codec, create=False) as opened:
        runner = ProjectionRunner(opened, [projection])
        with Progress(
            TextColumn("rebuilding {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
        ) as bar:
            task = bar.add_task(projection.name, total=None)

            def progress(name: str, position: int, target: int) -> None:
                bar.update(task, completed=position, total=target)

            position = await runner.rebuild(projection.name, progress=progress)
        state = await runner.store.projection_state(projection.name)
    generation = state.generation if state is not None else "?"
    console.print(
        Text(
            f"Rebuilt {projection.name}: generation {generation} is live, at position "
            f"{position}; the old generation is dropped."
        )
    )


def load_projections(target: str) -> dict[str, Projection]:
    """The projections `--app` names, by name: see `rebuild --help` for the forms."""
    module_name, _, attribute = target.partition(":")
    if not module_name:
        raise ConfigurationError(f"--app {target!r}: name a module, e.g. myapp.projections")
    module = import_module(module_name)
    found: list[Any]
    if attribute:
        try:
            value = getattr(module, attribute)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name} has no attribute {attribute!r}"
            ) from None
        if callable(value) and not isinstance(value, type):
            value = value()
        found = list(value) if isinstance(value, (list, tuple)) else [value]
    else:
        found = [
            value
            for value in vars(module).values()
            if isinstance(value, Projection)
            or (
                _is_projection_class(value)
                and value.__module__ == module.__name__  # defined here, not imported
                and value.__handlers__  # a base class with no handlers is no projection
            )
        ]
    out: dict[str, Projection] = {}
    for item in found:
        projection = _instance(item, target)
        if projection.name in out:
            if type(out[projection.name]) is type(projection):
                if isinstance(item, Projection):  # an instance wins over its bare class
                    out[projection.name] = projection
                continue
            raise ConfigurationError(f"{target}: two projections are named {projection.name!r}")
        out[projection.name] = projection
    return out


def registry_for(*projections: Projection) -> TypeRegistry:
    """The registry that decodes what `projections` read: their handlers' event classes'.

    Usually that is one registry (the default one, or an application's own); classes from
    several registries are merged into a new one. Events of other types arrive as
    `UnknownEvent`, which a handler naming their class still receives typed.
    """
    classes: set[type[Event]] = set()
    for projection in projections:
        classes |= projection.__handlers__.event_classes()
        manager = getattr(projection, "manager", None)  # a ProcessDriver: its manager's types
        if manager is not None:
            classes |= manager.__reactions__.event_classes() | manager.__handlers__.event_classes()
    return TypeRegistry.of(classes)  # a type name claimed twice raises DuplicateEventType


def _is_projection_class(value: object) -> TypeGuard[type[Projection]]:
    return isinstance(value, type) and issubclass(value, Projection) and value is not Projection


def _instance(item: object, target: str) -> Projection:
    if isinstance(item, Projection):
        return item
    if _is_projection_class(item):
        try:
            made: Projection = item()
        except TypeError as exc:
            raise ConfigurationError(
                f"{target}: cannot create {item.__qualname__}() without arguments ({exc}); "
                "put an instance in the module or name a list with --app module:ATTRIBUTE"
            ) from None
        return made
    raise ConfigurationError(f"{target}: {item!r} is not a Projection instance or class")
