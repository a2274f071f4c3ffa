"""The broker's pages: its dead letters, one letter, replaying it (with the token), and the
consumer groups the `--app` services and the dead letters name.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tidings.brokers.base import DeadLetter, DeadLetterNotFound
from tidings.console import queries
from tidings.console.rendering import _render, _require_token
from tidings.console.runtime import Console


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


async def _named_letter(request: Request, *, replay: bool = False) -> DeadLetter:
    """The dead letter the path names, replayed first when `replay`; 404 without one."""
    console: Console = request.app.state.console
    if console.broker is None:
        raise HTTPException(404, "no broker: start the console with --broker URL")
    fetch = console.broker.replay if replay else console.broker.dead_letter
    try:
        return await fetch(request.path_params["id"])
    except DeadLetterNotFound as exc:
        raise HTTPException(404, str(exc)) from None


async def dead_letter(request: Request) -> Response:
    letter = await _named_letter(request)
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
    letter = await _named_letter(request, replay=True)
    return RedirectResponse(f"/dead-letters?replayed={quote(letter.id)}", status_code=303)


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
