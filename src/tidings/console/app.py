"""The console's Starlette application: `create_app(stores, broker=None, token=...)`.

Pages are rendered on the server with Jinja2 (autoescaping on: event data is always text);
the only script is `static/console.js` (the live log and the keyboard), served from the
package. Every response forbids inline scripts and any other origin (Content-Security-Policy),
requests must name a local host (no DNS rebinding), and every POST needs the token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidings import __version__, telemetry
from tidings.app.runner import ProjectionRunner, ProjectionStatus, projection_status
from tidings.brokers.base import BrokerBase, DeadLetter, DeadLetterNotFound
from tidings.console import queries
from tidings.console.parts import AppParts, load_app
from tidings.core.errors import TidingsError
from tidings.core.urls import redact_url
from tidings.store import EventStore

__all__ = ["LOCAL_HOSTS", "Console", "create_app", "new_token", "redact_url"]

log = logging.getLogger("tidings.console")

HERE = Path(__file__).parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
TOKEN_HEADER = "x-tidings-token"
SAMPLE_EVERY = 5.0  # seconds between two samples of projection lag, for the chart
SAMPLES = 720  # samples kept per projection: an hour at 5 s
MAX_FORM = 64 * 1024

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def new_token() -> str:
    """A fresh random token for the actions that change state."""
    return secrets.token_urlsafe(24)


@dataclass
class StoreEntry:
    label: str
    store: EventStore


@dataclass
class Console:
    """The state behind the pages: stores, broker, token, app parts and lag samples."""

    stores: list[StoreEntry]
    broker: BrokerBase | None
    broker_label: str
    token: str
    parts: AppParts
    lag: dict[tuple[int, str], deque[tuple[float, int, float]]] = field(default_factory=dict)
    rebuilds: dict[tuple[int, str], str] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    last_sample: float = 0.0

    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest((given or "").encode(), self.token.encode())

    def entry(self, number: int) -> StoreEntry:
        if not 0 <= number < len(self.stores):
            raise HTTPException(404, f"no store number {number}")
        return self.stores[number]

    async def sample(self) -> dict[int, list[ProjectionStatus]]:
        """Every store's projection status, recorded for the lag charts."""
        now = time.time()
        out: dict[int, list[ProjectionStatus]] = {}
        for number, entry in enumerate(self.stores):
            try:
                found = await projection_status(entry.store)
            except (TidingsError, OSError) as exc:
                log.warning("console: projection status of %s: %s", entry.label, exc)
                continue
            out[number] = found
            for item in found:
                series = self.lag.setdefault((number, item.name), deque(maxlen=SAMPLES))
                series.append((now, item.lag_events, item.lag_seconds))
        self.last_sample = now
        return out

    async def sampler(self) -> None:
        while True:
            if time.time() - self.last_sample >= SAMPLE_EVERY * 0.9:
                await self.sample()
            await asyncio.sleep(SAMPLE_EVERY)


# -- rendering -------------------------------------------------------------------------------

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["pretty"] = queries.pretty
_env.filters["q"] = lambda value: quote(str(value), safe="")
_env.filters["path"] = lambda value: quote(str(value), safe="/")
_env.filters["when"] = lambda moment: moment.isoformat(" ", timespec="milliseconds")[:23]
_env.filters["data"] = queries.event_data
_env.filters["compact"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    console: Console = request.app.state.console
    number = request.path_params.get("n", 0)
    page = _env.get_template(name).render(
        console=console,
        n=number,
        store_label=console.stores[number].label if number < len(console.stores) else "",
        path=request.url.path,
        search=request.query_params.get("q", ""),
        PAGE=queries.PAGE,
        version=__version__,
        query=lambda **args: "?" + urlencode({k: v for k, v in args.items() if v is not None}),
        **context,
    )
    return HTMLResponse(page, status_code=status)


def _int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    try:
        return max(0, int(value))
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, not {value!r}") from None


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form body (no multipart library needed)."""
    body = await request.body()
    if len(body) > MAX_FORM:
        raise HTTPException(413, "form too large")
    parsed = parse_qs(body.decode("utf-8", "replace"))
    return {key: values[-1] for key, values in parsed.items()}


async def _require_token(request: Request) -> None:
    console: Console = request.app.state.console
    given = request.headers.get(TOKEN_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        given = (await _form(request)).get("token")
    if not console.token_ok(given):
        raise HTTPException(
            403,
            "refused: this action changes state and needs the token `tidings console` "
            "printed when it started",
        )


# -- pages -----------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/s/0/streams", status_code=302)


async def streams(request: Request) -> Response:
    entry = request.app.state.console.entry(request.path_params["n"])
    query = request.query_params.get("q", "").strip()
    page = await queries.streams_page(entry.store, query, request.query_params.get("after", ""))
    head = await entry.store.last_position()
    return _render(request, "streams.html", page=page, head=head, title="streams")


async def stream(request: Request) -> Response:
    entry = request.app.state.console.entry(request.path_params["n"])
    stream_id = request.path_params["stream_id"]
    page = await queries.stream_page(entry.store, stream_id, _int(request, "from"))
    if page.version == 0:
        raise HTTPException(404, f"no stream {stream_id!r} in this store")
    return _render(request, "stream.html", page=page, title=stream_id)


async def state(request: Request) -> Response:
    console: Console = request.app.state.console
    entry = console.entry(request.path_params["n"])
    stream_id = request.path_params["stream_id"]
    aggregate = console.parts.aggregate_for(stream_id)
    try:
        page = await queries.state_page(entry.store, stream_id, _int(request, "version"), aggregate)
    except TidingsError as exc:  # the aggregate cannot apply an event: fall back to data
        page = await queries.state_page(entry.store, stream_id, _int(request, "version"))
        page.note = f"{aggregate.__qualname__ if aggregate else ''} failed ({exc}); showing data"
    if page.stream_version == 0:
        raise HTTPException(404, f"no stream {stream_id!r} in this store")
    return _render(request, "state.html", page=page, title=f"{stream_id} at v{page.version}")


async def log_view(request: Request) -> Response:
    entry = request.app.state.console.entry(request.path_params["n"])
    page = await queries.log_page(entry.store, _int(request, "before"))
    return _render(request, "log.html", page=page, title="global log")


async def live(request: Request) -> Response:
    """Server-sent events: every event appended after `after` (or Last-Event-ID)."""
    entry = request.app.state.console.entry(request.path_params["n"])
    resume = request.headers.get("last-event-id")
    after = int(resume) if resume and resume.isdigit() else _int(request, "after")
    if after is None:
        after = await entry.store.last_position()
    return StreamingResponse(
        _events(entry.store, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _events(store: EventStore, after: int) -> AsyncIterator[str]:
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        async for record in store.subscribe(after, keep_unknown=True):
            await queue.put(record)

    task = asyncio.create_task(pump())
    try:
        yield "retry: 2000\n\n"
        while True:
            try:
                async with asyncio.timeout(15):
                    record = await queue.get()
            except TimeoutError:
                if task.done():
                    return  # the store closed or failed: the browser reconnects
                yield ": keep-alive\n\n"
                continue
            payload = json.dumps(queries.record_json(record), ensure_ascii=False)
            yield f"id: {record.position}\nevent: append\ndata: {payload}\n\n"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def trace(request: Request) -> Response:
    entry = request.app.state.console.entry(request.path_params["n"])
    correlation_id = (
        request.path_params.get("correlation_id") or request.query_params.get("id", "")
    ).strip()
    if not correlation_id:
        return _render(request, "trace.html", page=None, title="trace", scan=queries.TRACE_SCAN)
    if "correlation_id" not in request.path_params:
        return RedirectResponse(f"/s/{request.path_params['n']}/trace/{quote(correlation_id)}")
    page = await queries.trace_page(entry.store, correlation_id, _int(request, "before"))
    return _render(
        request, "trace.html", page=page, title=f"trace {correlation_id}", scan=queries.TRACE_SCAN
    )


async def projections(request: Request) -> Response:
    console: Console = request.app.state.console
    number = request.path_params["n"]
    entry = console.entry(number)
    if time.time() - console.last_sample > 1.0:
        found = (await console.sample()).get(number, [])
    else:
        found = await projection_status(entry.store)
    head = await entry.store.last_position()
    charts = {item.name: _chart(console.lag.get((number, item.name), ())) for item in found}
    return _render(
        request,
        "projections.html",
        statuses=found,
        head=head,
        charts=charts,
        rebuilds={name: text for (k, name), text in console.rebuilds.items() if k == number},
        can_rebuild=set(console.parts.projections),
        title="projections",
    )


def _chart(samples: Any, width: int = 320, height: int = 60) -> dict[str, Any]:
    """An SVG polyline of lag in events over the samples kept (numbers only)."""
    points = list(samples)
    if not points:
        return {"points": "", "max": 0, "count": 0, "width": width, "height": height}
    start, end = points[0][0], points[-1][0]
    span = max(end - start, 1.0)
    top = max(max(p[1] for p in points), 1)
    coords = " ".join(
        f"{(t - start) / span * width:.1f},{height - lag / top * (height - 4) - 2:.1f}"
        for t, lag, _ in points
    )
    if len(points) == 1:
        coords += f" {width:.1f},{height - points[0][1] / top * (height - 4) - 2:.1f}"
    return {
        "points": coords,
        "max": top,
        "count": len(points),
        "width": width,
        "height": height,
        "minutes": round(span / 60, 1),
    }


async def rebuild(request: Request) -> Response:
    await _require_token(request)
    console: Console = request.app.state.console
    number = request.path_params["n"]
    entry = console.entry(number)
    name = request.path_params["name"]
    projection = console.parts.projections.get(name)
    if projection is None:
        raise HTTPException(
            409, f"cannot rebuild {name!r}: start the console with --app naming its module"
        )
    key = (number, name)
    if console.rebuilds.get(key, "").startswith("running"):
        raise HTTPException(409, f"{name} is already being rebuilt")
    console.rebuilds[key] = "running"

    async def work() -> None:
        try:
            position = await ProjectionRunner(entry.store, [projection]).rebuild(name)
            console.rebuilds[key] = f"rebuilt to position {position}"
        except Exception as exc:  # shown on the page; the old generation stays live
            console.rebuilds[key] = f"failed: {exc}"

    task = asyncio.create_task(work())
    console.tasks.add(task)
    task.add_done_callback(console.tasks.discard)
    return RedirectResponse(f"/s/{number}/projections", status_code=303)


async def dead_letters(request: Request) -> Response:
    console: Console = request.app.state.console
    topic = request.query_params.get("topic") or None
    found: list[DeadLetter] = []
    if console.broker is not None:
        found = await console.broker.dead_letters(topic)
    after = request.query_params.get("after")
    start = 0
    if after:
        start = next((i + 1 for i, d in enumerate(found) if d.id == after), 0)
    page = found[start : start + queries.PAGE]
    more = start + queries.PAGE < len(found)
    return _render(
        request,
        "dead_letters.html",
        letters=page,
        total=len(found),
        topic=topic,
        next_after=page[-1].id if more and page else None,
        done=request.query_params.get("replayed"),
        title="dead letters",
    )


async def dead_letter(request: Request) -> Response:
    console: Console = request.app.state.console
    if console.broker is None:
        raise HTTPException(404, "no broker: start the console with --broker URL")
    try:
        letter = await console.broker.dead_letter(request.path_params["id"])
    except DeadLetterNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    record = letter.to_dict()
    body: Any = record.get("data", "")
    try:
        body = queries.pretty(json.loads(body))
    except (ValueError, TypeError):
        pass
    return _render(
        request, "dead_letter.html", letter=letter, record=record, body=body, title="dead letter"
    )


async def replay(request: Request) -> Response:
    await _require_token(request)
    console: Console = request.app.state.console
    if console.broker is None:
        raise HTTPException(404, "no broker: start the console with --broker URL")
    try:
        letter = await console.broker.replay(request.path_params["id"])
    except DeadLetterNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return RedirectResponse(f"/dead-letters?replayed={quote(letter.id)}", status_code=303)


async def metrics(request: Request) -> Response:
    """Prometheus text: tidings' counters in this process and every store's projection lag."""
    console: Console = request.app.state.console
    for entry in console.stores:
        try:
            telemetry.observe_projections(await projection_status(entry.store))
        except TidingsError as exc:  # a store that went away: the rest still report
            log.warning("metrics: %s: %s", entry.label, exc)
    return Response(telemetry.prometheus_text(), media_type=telemetry.CONTENT_TYPE)


async def groups(request: Request) -> Response:
    console: Console = request.app.state.console
    known: dict[tuple[str, str], dict[str, Any]] = {}
    for service in console.parts.services:
        for topic, group in service.subscriptions:
            known.setdefault((topic, group), {"dead": 0, "from": set()})["from"].add(
                f"service {service.name}"
            )
    if console.broker is not None:
        for letter in await console.broker.dead_letters():
            row = known.setdefault((letter.topic, letter.group), {"dead": 0, "from": set()})
            row["dead"] += 1
            row["from"].add("dead letters")
    rows = [
        {"topic": t, "group": g, "dead": v["dead"], "from": ", ".join(sorted(v["from"]))}
        for (t, g), v in sorted(known.items())
    ]
    return _render(request, "groups.html", rows=rows, title="consumer groups")


async def error_page(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error (see the log)"
    if request.url.path.endswith("/live") or request.headers.get("accept") == "application/json":
        return Response(detail, status_code=status, media_type="text/plain")
    return _render(request, "error.html", status, code=status, message=detail, title=f"{status}")


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
