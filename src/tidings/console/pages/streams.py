"""The store's pages: its streams (and the events a `tag:` search finds), one stream, a
stream's state at a version (time travel, through the `--app` aggregate when there is one),
and the global log.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tidings.console import queries
from tidings.console.rendering import _int, _render
from tidings.console.runtime import Console
from tidings.core.errors import TidingsError


async def home(request: Request) -> Response:
    return RedirectResponse("/s/0/streams", status_code=302)


async def streams(request: Request) -> Response:
    """The search: a stream-id prefix, or `tag:TAG` terms for the events carrying them."""
    entry = request.app.state.console.entry(request.path_params["n"])
    query = request.query_params.get("q", "").strip()
    try:
        tags = queries.search_tags(query)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if tags is not None:
        tagged = await queries.tagged_page(entry.store, tags, _int(request, "after") or 0)
        title = "tagged " + " ".join(tags)
        return _render(request, "tagged.html", page=tagged, title=title)
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
