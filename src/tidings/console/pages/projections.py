"""The projections page (status, lag charts drawn from the samples, rebuilds started with
the token) and `/metrics`, the same lag and tidings' counters for Prometheus.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tidings import telemetry
from tidings.app.runner import ProjectionRunner, projection_status
from tidings.console.rendering import _render, _require_token
from tidings.console.runtime import Console, log
from tidings.core.errors import TidingsError


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


async def metrics(request: Request) -> Response:
    """Prometheus text: tidings' counters in this process and every store's projection lag."""
    console: Console = request.app.state.console
    for entry in console.stores:
        try:
            telemetry.observe_projections(await projection_status(entry.store))
        except TidingsError as exc:  # a store that went away: the rest still report
            log.warning("metrics: %s: %s", entry.label, exc)
    return Response(telemetry.prometheus_text(), media_type=telemetry.CONTENT_TYPE)
