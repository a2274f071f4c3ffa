"""The console's Starlette application: `create_app(stores, broker=None, token=...)`.

Pages are rendered on the server with Jinja2 (autoescaping on: event data is always text);
the only script is `static/console.js` (the live log and the keyboard), served from the
package. Every response forbids inline scripts and any other origin (Content-Security-Policy),
requests must name a local host (no DNS rebinding), and every POST needs the token.

This module holds the factory, the routes and the security headers; the pages are in
`tidings.console.pages`, the state behind them in `runtime` and rendering in `rendering`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidings import telemetry
from tidings.brokers.base import BrokerBase
from tidings.console.pages.dead_letters import dead_letter, dead_letters, groups, replay
from tidings.console.pages.live import live
from tidings.console.pages.projections import metrics, projections, rebuild
from tidings.console.pages.streams import home, log_view, state, stream, streams
from tidings.console.pages.traces import trace
from tidings.console.parts import AppParts, load_app
from tidings.console.rendering import HERE, error_page
from tidings.console.runtime import SAMPLE_EVERY, Console, StoreEntry, new_token
from tidings.core.urls import redact_url
from tidings.store import EventStore

__all__ = ["LOCAL_HOSTS", "Console", "create_app", "new_token", "redact_url"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# -- security headers ------------------------------------------------------------------------


class _SecurityHeaders:
    """Adds a strict Content-Security-Policy and friends to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


# -- the factory -----------------------------------------------------------------------------


def create_app(
    stores: Sequence[EventStore] | Mapping[str, EventStore],
    broker: BrokerBase | None = None,
    token: str | None = None,
    app_module: str | AppParts | None = None,
    *,
    broker_label: str = "",
    allowed_hosts: Sequence[str] = (),
    sample_every: float | None = SAMPLE_EVERY,
) -> Starlette:
    """The console as an ASGI application.

    Args:
        stores: the stores to show (a list, or a mapping from label to store). The app opens
            them when it starts and closes them when it stops.
        broker: the broker whose dead letters to show and replay (opened and closed too).
        token: the secret that POST requests must carry (header `X-Tidings-Token` or form
            field `token`); a new random one when None (read it from `app.state.token`).
        app_module: `--app`: a module (or `AppParts`) with projections to rebuild, aggregates
            for time travel and services whose consumer groups to list. The stores should
            then decode its event classes (`AppParts.registry()`).
        allowed_hosts: host names requests may use besides the local ones.
        sample_every: seconds between samples of projection lag; None samples only when
            the projections page is opened.
    """
    if isinstance(stores, Mapping):
        entries = [StoreEntry(label, store) for label, store in stores.items()]
    else:
        entries = [StoreEntry(getattr(s, "url", type(s).__name__), s) for s in stores]
    if not entries:
        raise ValueError("the console needs at least one store")
    parts = load_app(app_module) if isinstance(app_module, str) else app_module or AppParts()
    console = Console(
        entries,
        broker,
        broker_label or (getattr(broker, "url", "") if broker is not None else ""),
        token or new_token(),
        parts,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened: list[Any] = []
        sampler: asyncio.Task[None] | None = None
        try:
            for entry in console.stores:
                await entry.store.open()
                opened.append(entry.store)
            if broker is not None:
                await broker.open()
                opened.append(broker)
            if sample_every is not None:
                sampler = asyncio.create_task(console.sampler())
            telemetry.enable_metrics()
            yield
        finally:
            tasks = [*console.tasks, *([sampler] if sampler is not None else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for resource in reversed(opened):
                await resource.aclose()

    routes = [
        Route("/", home),
        Route("/s/{n:int}/streams", streams),
        Route("/s/{n:int}/stream/{stream_id:path}", stream),
        Route("/s/{n:int}/state/{stream_id:path}", state),
        Route("/s/{n:int}/log", log_view),
        Route("/s/{n:int}/log/live", live),
        Route("/s/{n:int}/trace", trace),
        Route("/s/{n:int}/trace/{correlation_id:path}", trace),
        Route("/s/{n:int}/projections", projections),
        Route("/s/{n:int}/projections/{name}/rebuild", rebuild, methods=["POST"]),
        Route("/dead-letters", dead_letters),
        Route("/dead-letters/{id}", dead_letter),
        Route("/dead-letters/{id}/replay", replay, methods=["POST"]),
        Route("/groups", groups),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    hosts = [*LOCAL_HOSTS, *allowed_hosts]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(_SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
        ],
        exception_handlers={HTTPException: error_page, 500: error_page},
    )
    app.state.console = console
    app.state.token = console.token
    return app
