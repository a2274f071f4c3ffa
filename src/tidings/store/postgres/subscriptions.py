"""Waking subscribers of the PostgreSQL store: LISTEN/NOTIFY.

Subscribers are woken by LISTEN/NOTIFY on a dedicated connection; while it is down (or a hole
is pending) they poll with a short backoff, and the listener reconnects by itself. Appends
announce themselves after their commit, a burst in one notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tidings.store.postgres.connection import _CONNECTION_ERRORS, PostgresCore, _describe, log

__all__ = ["PostgresSubscriptions"]

_SAFETY_POLL = 5.0  # seconds between reads of a listening subscriber with nothing to do
_NOTIFY_DELAY = 0.002  # seconds a notification waits to carry the appends that follow it


class PostgresSubscriptions(PostgresCore):
    """The listening connection, the idle wait of a subscriber, and NOTIFY after appends."""

    async def _listen_forever(self) -> None:
        """Keep a listening connection; reconnect with backoff when it drops."""
        delay = 0.1
        while not self._closed:
            try:
                self._connecting = asyncio.ensure_future(
                    asyncpg.connect(
                        self.dsn,
                        timeout=self.connect_timeout,
                        command_timeout=self.query_timeout or None,
                    )
                )
                conn = await asyncio.shield(self._connecting)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("LISTEN on %s failed: %s; retrying", self.address, _describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(self.channel, self._notified)
                self._listener, self._listening, delay = conn, True, 0.1
                self._signal.notify()  # anything appended while we were deaf is read now
                await self._while_alive(conn, lost)
                log.warning("LISTEN connection to %s lost; polling until it is back", self.address)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning(
                    "LISTEN connection to %s failed: %s; polling until it is back",
                    self.address,
                    _describe(exc),
                )
                await asyncio.sleep(delay)
            finally:
                self._listening = False
                self._listener = None
                self._signal.notify()  # sleeping subscribers switch to polling now
                if not lost.is_set():
                    conn.terminate()  # no await: this may run while being cancelled

    async def _while_alive(self, conn: Any, lost: asyncio.Event) -> None:
        """Return when the listening connection ends; a query every `query_timeout` raises
        on one that stalled without ending (it would otherwise stay deaf for ever)."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.query_timeout or None):
                    await lost.wait()
            if not lost.is_set():
                await conn.execute("SELECT 1")  # under query_timeout

    def _notified(self, *_args: Any) -> None:
        self._signal.notify()

    def _idle_wait(self, backoff: float) -> float | None:
        """Sleep until notified while the listener is up and no hole is pending (with a slow
        safety poll, since a notification is sent after its commit); else poll quickly.

        The listening connection is opened by the first subscriber that waits, so a
        process that only appends never holds one.
        """
        if self.listen and self._listener_task is None and not self._closed:
            self._listener_task = asyncio.create_task(
                self._listen_forever(), name=f"tidings listen {self.channel}"
            )
        if self._listening and not self._holes:
            return _SAFETY_POLL
        return backoff

    def _announce(self) -> None:
        """Notify other processes' subscribers, after the commit, merging a burst into one.

        NOTIFY inside the append would hold PostgreSQL's notification lock through the commit's
        disk flush and serialise every writer, so it is sent from here instead, in its own
        transaction with `synchronous_commit` off.
        """
        self._announce_wanted = True
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.create_task(self._announce_loop())

    async def _announce_loop(self) -> None:
        # Runs on while the store closes (`_close` waits for it), so a process that appends
        # and exits still wakes the others at once.
        while self._announce_wanted and self._pool is not None:
            await asyncio.sleep(_NOTIFY_DELAY)  # appends meanwhile share this notification
            self._announce_wanted = False
            try:
                async with self._pool.acquire() as conn:
                    try:
                        await conn.execute(
                            "SELECT set_config('synchronous_commit', 'off', true), "
                            "pg_notify($1, '')",
                            self.channel,
                        )
                    except TimeoutError:
                        await self._drop_silent(conn)
                        raise
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("NOTIFY %s failed: %s", self.channel, _describe(exc))
                return  # subscribers' safety poll covers it


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    def set_it(_conn: Any) -> None:
        event.set()

    return set_it
