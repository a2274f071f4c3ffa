"""`PostgresCore`: what every part of the PostgreSQL store builds on.

It declares the state `PostgresEventStore.__init__` sets up, hands out connections (one held
out of the pool for a lone caller) with driver errors translated, and drops connections whose
link went silent. The small connection helpers live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tidings.core.errors import StoreClosed, StoreError
from tidings.store.base import StoreBase

__all__ = ["PostgresCore"]

log = logging.getLogger("tidings.store.postgres")

_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    # A query on a connection the server has just ended (say, a fast shutdown's FATAL
    # arrived, the close not yet): "cannot switch to state 12; another operation is in
    # progress". The connection is gone; the call is retried on another.
    asyncpg.exceptions.InternalClientError,
)


class PostgresCore(StoreBase):
    """The connection layer of `PostgresEventStore`, which its mixins build on."""

    # Set by `PostgresEventStore.__init__` (see there).
    url: str
    dsn: str
    address: str
    schema: str
    _s: str
    channel: str
    min_size: int
    max_size: int
    connect_timeout: float
    create: bool
    listen: bool
    query_timeout: float
    _pool: asyncpg.Pool | None
    _listener: asyncpg.Connection | None
    _listener_task: asyncio.Task[None] | None
    _connecting: asyncio.Future[Any] | None
    _announcer: asyncio.Task[None] | None
    _held: Any
    _held_busy: bool
    _announce_wanted: bool
    _listening: bool
    _holes: dict[int, int]
    _skipped: set[int]
    _young: dict[int, float]
    _settled_to: int

    async def _close_pool(self, pool: Any) -> None:
        """Close gracefully, but within `connect_timeout`: a connection on a link that went
        silent would hold a graceful close for ever. Then every connection is dropped."""
        held, self._held = self._held, None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if held is not None:
                    with contextlib.suppress(asyncpg.InterfaceError):
                        await pool.release(held)
                await pool.close()
        except TimeoutError:
            log.warning(
                "closing the connections to %s took over %gs; dropped them",
                self.address,
                self.connect_timeout,
            )
            pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> Any:
        """A connection, with driver errors translated.

        One connection is kept out of the pool for whoever needs one when it is free: a lone
        writer or reader skips the pool's acquire and release (a task per release), which
        is a tenth of a single append's time. Concurrent callers use the pool.
        """
        if self._pool is None or self._closed:
            raise StoreClosed("the store is closed")
        held = self._held
        try:
            if held is not None and not self._held_busy:
                if _unusable(held):
                    self._held = None  # lost: from now on, everything goes through the pool
                    with contextlib.suppress(asyncpg.InterfaceError):
                        await self._pool.release(held)  # the pool discards a closed one
                else:
                    self._held_busy = True
                    try:
                        yield held
                    except TimeoutError:
                        await self._drop_silent(held)
                        raise
                    finally:
                        self._held_busy = False
                    return
            async with self._pool.acquire() as conn:
                try:
                    yield conn
                except TimeoutError:
                    await self._drop_silent(conn)
                    raise
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreError(f"PostgreSQL at {self.address}: {_describe(exc)}") from exc
        except UnicodeDecodeError as exc:  # a stream id or key written around tidings
            raise StoreError(
                f"PostgreSQL at {self.address}: a stored stream id or key is not UTF-8 ({exc})"
            ) from exc
        except OverflowError as exc:  # a time before year 1, written around tidings
            raise StoreError(f"PostgreSQL at {self.address}: a stored value: {exc}") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of one query, run on a connection of its own."""
        async with self._connection() as conn:
            rows: list[Any] = await conn.fetch(sql, *args)
        return rows

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        """The first value of one query, run on a connection of its own."""
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> None:
        """Run one statement on a connection of its own."""
        async with self._connection() as conn:
            await conn.execute(sql, *args)

    async def _drop_silent(self, conn: Any) -> None:
        """A query outlived `query_timeout`: its link is stalled, or its answer is lost. The
        connection is never used again, and neither is any other made before it (they
        likely share the silent path): the pool replaces each on its next use, so a retry
        meets a fresh connection rather than the next stalled one."""
        conn.terminate()
        held = self._held
        if held is not None and held is not conn and not self._held_busy:
            held.terminate()  # (`_connection` hands it back to the pool, which drops it)
        if self._pool is not None:
            await self._pool.expire_connections()


def _unusable(conn: Any) -> bool:
    """Whether a held pool connection broke (the pool may already have taken it back)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


async def _keep_session(conn: Any) -> None:
    """Return a connection to the pool as it is (asyncpg still rolls back an open
    transaction): tidings leaves no session state behind (its advisory locks are
    transaction-scoped and LISTEN has its own connection), and asyncpg's default reset
    query would cost every append a second round trip."""


async def _init_connection(conn: Any) -> None:
    """Stream ids and keys are UTF-8 in `bytea`: convert them at the driver."""
    await conn.set_type_codec(
        "bytea", schema="pg_catalog", encoder=str.encode, decoder=bytes.decode, format="binary"
    )


async def _quietly_close(conn: Any) -> None:
    try:
        async with asyncio.timeout(2.0):
            await conn.close()
    except Exception:
        conn.terminate()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
