"""`AppendSignal`: how an append wakes the subscribers waiting in the same process.

Its own module because the store core creates one per store (and SQLite shares one per
database file) while the subscription loop waits on it; both import it from here.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["AppendSignal"]


class AppendSignal:
    """Wakes waiting subscribers when this process appends; safe to notify from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    @property
    def seq(self) -> int:
        """Changes every time `notify` is called."""
        return self._seq

    def notify(self) -> None:
        """Wake every waiter (from any thread)."""
        with self._lock:
            self._seq += 1
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass

    async def wait(self, seen: int, timeout: float | None) -> None:
        """Return once `seq` differs from `seen`, or after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self._seq != seen:
                return
            self._waiters.add(entry)
        try:  # not asyncio.wait_for: on 3.11 it loses a cancel that races a wake-up
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
