"""`tidings dlq list|show|replay` and `tidings run module:service`: the broker commands.

Every command takes `--broker URL` (or `$TIDINGS_BROKER`): `redis://…`, `amqp://…`,
`nats://…`. (`memory://` holds nothing between two commands.)
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tidings.app.service import Service
from tidings.brokers import open_broker
from tidings.cli.loading import import_target
from tidings.cli.store import JSONOption
from tidings.core.errors import ConfigurationError

__all__ = ["dlq", "run"]

BrokerOption = Annotated[
    str,
    typer.Option(
        "--broker",
        envvar="TIDINGS_BROKER",
        show_envvar=True,
        metavar="URL",
        help="The broker, e.g. redis://127.0.0.1:6379, amqp://guest:guest@127.0.0.1/, "
        "nats://127.0.0.1:4222.",
    ),
]

dlq = typer.Typer(
    name="dlq",
    help="Dead letters: messages a consumer group gave up on, with the error and attempts.",
    no_args_is_help=True,
)
run_app = typer.Typer()


@dlq.command("list")
def dlq_list(
    broker: BrokerOption,
    topic: Annotated[str | None, typer.Option(help="Only this topic's dead letters.")] = None,
    as_json: JSONOption = False,
) -> None:
    """One line per dead letter: id, topic, group, attempts, when, and the error."""

    async def main() -> None:
        async with open_broker(broker) as opened:
            letters = await opened.dead_letters(topic)
        if as_json:
            for dead in letters:
                typer.echo(json.dumps(dead.to_dict(), ensure_ascii=False))
            return
        table = Table(title=f"{len(letters)} dead letter(s)", title_justify="left")
        for column in ("id", "topic", "group", "type", "attempts", "failed at", "error"):
            table.add_column(column)
        for dead in letters:
            table.add_row(
                dead.id,
                dead.topic,
                dead.group,
                dead.message.type,
                str(dead.attempts),
                dead.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
                dead.error,
            )
        Console().print(table)

    asyncio.run(main())


@dlq.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID")],
    broker: BrokerOption,
) -> None:
    """Everything about one dead letter, including the original message, as JSON."""

    async def main() -> None:
        async with open_broker(broker) as opened:
            dead = await opened.dead_letter(dead_letter_id)
        typer.echo(json.dumps(dead.to_dict(), ensure_ascii=False, indent=2))

    asyncio.run(main())


@dlq.command("replay")
def dlq_replay(
    dead_letter_ids: Annotated[list[str], typer.Argument(metavar="ID...")],
    broker: BrokerOption,
) -> None:
    """Deliver dead letters again to the group that gave up on them (and only to it), and
    remove them from the dead letters."""

    async def main() -> None:
        async with open_broker(broker) as opened:
            for dead_letter_id in dead_letter_ids:
                dead = await opened.replay(dead_letter_id)
                typer.echo(f"replayed {dead.id} to {dead.topic}/{dead.group}")

    asyncio.run(main())


@run_app.command("run")
def run(
    target: Annotated[str, typer.Argument(metavar="MODULE:SERVICE")],
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            envvar="TIDINGS_BROKER",
            metavar="URL",
            help="Run the service on this broker instead of the one it was built with.",
        ),
    ] = None,
) -> None:
    """Run a `tidings.Service` until SIGINT or SIGTERM; in-flight handlers finish first."""
    service = import_target(target)
    if not isinstance(service, Service):
        raise ConfigurationError(f"{target} is a {type(service).__name__}, not a tidings.Service")

    async def main() -> None:
        if broker is not None:
            service.broker = open_broker(broker)
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, service.stop)
        async with service.broker:
            typer.echo(f"running {service.name}: {service.subscriptions}")
            await service.run()
        typer.echo(f"{service.name} stopped")

    asyncio.run(main())
