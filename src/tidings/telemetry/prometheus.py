"""The Prometheus side: tidings' metrics in the text exposition format, and a `/metrics`.

`prometheus_text()` renders the in-process metric families of `metrics` (what the console's
`/metrics` returns); `serve_metrics` serves it over a tiny HTTP/1.0 server (`tidings worker
--metrics-port`). The families are read through the `tidings.telemetry` package, so that
rebinding `tidings.telemetry.FAMILIES` (as a test does) changes what is rendered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import tidings.telemetry as package
from tidings.telemetry.metrics import DURATION_BUCKETS, Labels, _plain, enable_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format's content type."""

log = logging.getLogger("tidings.telemetry")

# -- the Prometheus text form -------------------------------------------------------------


def prometheus_text() -> str:
    """tidings' metrics in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for family in package.FAMILIES:  # through the package: see the module docstring
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(family.values.items()):
            if family.kind != "histogram":
                lines.append(f"{family.name}{_render(labels)} {_number(_plain(value))}")
                continue
            cumulative = 0
            for bound, count in zip((*DURATION_BUCKETS, None), value.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else _number(bound)
                lines.append(f"{family.name}_bucket{_render((*labels, ('le', le)))} {cumulative}")
            lines.append(f"{family.name}_sum{_render(labels)} {_number(value.sum)}")
            lines.append(f"{family.name}_count{_render(labels)} {cumulative}")
    return "\n".join(lines) + "\n"


def _render(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


# -- a /metrics endpoint ------------------------------------------------------------------


async def serve_metrics(
    host: str = "127.0.0.1",
    port: int = 0,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Server:
    """Serve `prometheus_text()` at `http://host:port/metrics` (a tiny HTTP/1.0 server);
    `refresh` runs before each scrape (to update the projection lag, say). Close the
    returned server to stop it; `server.sockets[0].getsockname()[1]` is the port."""
    enable_metrics()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # the headers: not needed
                parts = request.split()
                method = parts[0] if parts else b""
                path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
                if method in (b"GET", b"HEAD") and path == b"/metrics":
                    if refresh is not None:
                        try:
                            await refresh()
                        except Exception as exc:  # stale lag beats no metrics
                            log.warning("metrics: refresh failed: %s", exc)
                    status, kind, body = "200 OK", CONTENT_TYPE, prometheus_text().encode()
                else:
                    status, kind, body = "404 Not Found", "text/plain", b"not found\n"
                head = (
                    f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                writer.write(head if method == b"HEAD" else head + body)
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port)
