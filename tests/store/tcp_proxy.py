"""A loopback TCP proxy for tests that need a database connection to break on cue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "amqp": 5672, "redis": 6379, "nats": 4222}


def server_of(url: str) -> tuple[str, int]:
    """The host and port a server URL points at (the proxy's target)."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)


def through(url: str, port: int) -> str:
    """`url` with its server's address replaced by 127.0.0.1:`port` (the proxy); user,
    password, path and query kept."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


class TcpProxy:
    """Forwards 127.0.0.1:`port` (a free port) to `target_host:target_port`.

    `cut()` drops every live connection at once (both sides see a reset, as when a network
    link or the server goes away); while `refusing` is set, new connections are closed as soon
    as they arrive, so a client's reconnect fails too; while `muted` is set, what the server
    sends is dropped (it still gets and runs every request, the client hears nothing back).
    `stall()` makes every live connection a black hole for good, both ways, without closing
    it (a NAT or firewall that forgot the link: no reset ever comes); new ones work.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.refusing = False
        self.muted = False
        self._closing = False
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing = True
        # A connection accepted just before the close may still be on its way to `_accept`:
        # give it a moment, then reset everything the proxy ever accepted that is still open.
        await asyncio.sleep(0.05)
        while True:
            self.cut()
            for writer in self._accepted:
                writer.transport.abort()
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=0.1)
        await self._server.wait_closed()

    def cut(self) -> int:
        """Reset every live connection now; returns how many there were."""
        links, self._links = self._links, set()
        self._stalled.clear()
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        return len(links)

    def stall(self) -> int:
        """Swallow everything on every live connection from now on, and never close them
        (the client must notice by itself); returns how many there were."""
        self._stalled |= self._links
        return len(self._links)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, so asyncio calls it as the connection is made: nothing accepted can
        # slip past `__aexit__` before its handler task exists.
        self._accepted.add(writer)
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)  # so closing the proxy waits for this handler too
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._accepted.discard(writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing or self._closing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self._closing:
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, lambda: link in self._stalled)),
            asyncio.create_task(
                self._pump(up_reader, writer, lambda: self.muted or link in self._stalled)
            ),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)
        self._links.discard(link)
        self._stalled.discard(link)
        writer.transport.abort()
        up_writer.transport.abort()

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, muted: Callable[[], bool]
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                if not muted():
                    sink.write(data)
                    await sink.drain()
        sink.close()  # one side ended: end the other
