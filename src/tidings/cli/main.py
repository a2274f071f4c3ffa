"""The root `tidings` command: it gathers the command groups and is the error edge.

Library errors (`TidingsError`: a bad URL, a missing store, a version clash) end a command
with one `error: …` line on stderr and exit code 2, never a traceback. Usage errors keep
typer's own message and exit code 2.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from tidings import __version__
from tidings.cli import (
    brokers,
    console,
    demo,
    projections,
    relay,
    render,
    schema,
    store,
    trace,
    worker,
)
from tidings.core.errors import TidingsError

__all__ = ["app", "main"]


class _TidingsGroup(TyperGroup):
    """The root group: runs a command and turns a `TidingsError` into one line, exit 2."""

    # `ctx` is click's Context, which typer vendors privately; Any keeps us off its internals.
    def invoke(self, ctx: Any) -> Any:
        """Run the chosen command; a `TidingsError` becomes `error: …` on stderr, exit 2."""
        try:
            return super().invoke(ctx)
        except TidingsError as exc:
            typer.echo(render.error_line(exc), err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="tidings",
    cls=_TidingsGroup,
    help="Look into event stores and run the demos of tidings, the event-driven toolkit.\n\n"
    "Commands that read a store take --store URL or $TIDINGS_STORE "
    "(default sqlite:///./tidings.db).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tidings {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Look into event stores and run the demos of tidings, the event-driven toolkit.

    Commands that read a store take --store URL or $TIDINGS_STORE (default
    sqlite:///./tidings.db).
    """


app.add_typer(store.app)
app.add_typer(projections.app, name="projections")
app.add_typer(demo.app)
app.add_typer(worker.app)
app.add_typer(brokers.dlq, name="dlq")
app.add_typer(brokers.run_app)
app.add_typer(relay.app)
app.add_typer(trace.app)
app.add_typer(schema.app, name="schema")
app.add_typer(console.app)


def main() -> None:
    """Run the `tidings` command (the console script's entry point)."""
    app()


if __name__ == "__main__":
    main()
