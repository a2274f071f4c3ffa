"""`tidings worker`: run an application's projections and process managers until stopped.

Start the same worker in as many processes (or machines) as you like: each projection runs in
one of them at a time, the one holding its lease; when that process dies, another takes the
lease over once it expires and goes on from the committed checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from tidings import telemetry
from tidings.app.projections import Projection
from tidings.app.runner import ProjectionRunner, projection_status
from tidings.cli.projections import load_projections, registry_for
from tidings.cli.store import DEFAULT_STORE, StoreOption
from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError, TidingsError
from tidings.store import open_store

__all__ = ["app", "worker"]

app = typer.Typer()


@app.command()
def worker(
    app_path: Annotated[
        str,
        typer.Option(
            "--app",
            metavar="MODULE[:ATTR]",
            help="Where the projections are, as for `tidings projections rebuild --app`; "
            "ProcessDriver instances found there run too.",
        ),
    ],
    store: StoreOption = DEFAULT_STORE,
    lease: Annotated[
        float,
        typer.Option(
            help="Seconds a projection's lease lasts; renewed every third of it. Another "
            "worker takes over within about 1.3 x this after this one dies."
        ),
    ] = 5.0,
    owner: Annotated[
        str | None, typer.Option(help="This worker's name in the lease table.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Events per transaction.")] = 500,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
            "the line `metrics on URL` tells which)."
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="The address --metrics-port listens on.")
    ] = "127.0.0.1",
) -> None:
    """Run the projections of --app on --store until SIGINT or SIGTERM.

    Prints one line when this worker takes or loses a projection's lease
    (`holds NAME`, `waiting NAME`), so logs show who runs what.
    """
    projections = list(load_projections(app_path).values())
    if not projections:
        raise ConfigurationError(f"--app {app_path} holds no projections")
    asyncio.run(_work(store, projections, lease, owner, batch_size, metrics_port, metrics_host))


async def _work(
    url: str,
    projections: list[Projection],
    lease: float,
    owner: str | None,
    batch_size: int,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> None:
    codec = JSONCodec(registry_for(*projections), keep_unknown=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    async with open_store(url, codec=codec, create=False) as opened:
        runner = ProjectionRunner(
            opened, projections, lease=lease, owner=owner, batch_size=batch_size
        )
        names = ", ".join(p.name for p in projections)
        print(f"worker {runner.owner}: {names} (lease {lease:g}s)", flush=True)

        async def lag() -> None:  # the projections' lag, for /metrics and OpenTelemetry
            telemetry.observe_projections(await projection_status(opened))

        server = None
        if metrics_port is not None:
            server = await telemetry.serve_metrics(metrics_host, metrics_port, lag)
            port = server.sockets[0].getsockname()[1]
            print(f"metrics on http://{metrics_host}:{port}/metrics", flush=True)
        ticks = 0
        async with runner:
            held: dict[str, bool] = {}
            while not stop.is_set():
                ticks += 1
                if ticks % 25 == 0 and telemetry.meter() is not None:
                    with contextlib.suppress(TidingsError, OSError):
                        await lag()
                for name, now in runner.leases().items():
                    if held.get(name) != now:
                        print(f"{'holds' if now else 'waiting'} {name}", flush=True)
                        held[name] = now
                try:
                    async with asyncio.timeout(0.2):
                        await stop.wait()
                except TimeoutError:
                    pass
        if server is not None:
            server.close()
    print(f"worker {runner.owner}: stopped", flush=True)
