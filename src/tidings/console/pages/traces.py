"""The trace page: the causation tree of one correlation id, or a form asking for one."""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tidings.console import queries
from tidings.console.rendering import _int, _render


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
