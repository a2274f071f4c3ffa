"""The live log: every event appended to a store, pushed to the browser as server-sent
events (`static/console.js` shows them), resuming after Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tidings.console import queries
from tidings.console.rendering import _int
from tidings.store import EventStore


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
