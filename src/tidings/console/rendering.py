"""Rendering and reading requests, for every page: the Jinja2 environment (autoescaping on:
event data is always text), query and form parameters, the token check, the error page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from tidings import __version__
from tidings.console import queries
from tidings.console.runtime import Console

HERE = Path(__file__).parent
TOKEN_HEADER = "x-tidings-token"
MAX_FORM = 64 * 1024

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
_env.filters["tag_search"] = queries.tag_search
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


async def error_page(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error (see the log)"
    if request.url.path.endswith("/live") or request.headers.get("accept") == "application/json":
        return Response(detail, status_code=status, media_type="text/plain")
    return _render(request, "error.html", status, code=status, message=detail, title=f"{status}")
