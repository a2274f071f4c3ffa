"""`PostgresEventStore`: the store for many processes and machines, on asyncpg.

Every append is one round trip: a PL/pgSQL function takes the stream's row lock (so writers of
different streams never wait for each other), checks the expected version, draws positions
from a sequence and inserts the events. Positions therefore commit out of order, and a reader
must not skip one that is still in flight. `_read_all_batch` reads in position order up to the
first hole and treats a hole as permanent (a rolled-back or unused sequence value) only once
every transaction that could have drawn it has ended: a writer takes its transaction id before
it draws positions, and a hole is closed when the oldest running transaction id is above a
"guard" id taken after the hole was seen (see ARCHITECTURE.md for why both steps matter).

Subscribers are woken by LISTEN/NOTIFY on a dedicated connection; while it is down (or a hole
is pending) they poll with a short backoff, and the listener reconnects by itself.

Stream ids and read-model keys are stored as UTF-8 `bytea`, because PostgreSQL text cannot hold
a NUL character and stream ids may be any text; byte order is code point order, the same order
SQLite and the memory store use.

The store is assembled here from one mixin per concern, in the modules beside this one.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError, StoreError
from tidings.store.base import DEFAULT_MAX_EVENT_SIZE, url_options
from tidings.store.postgres.append import PostgresAppending
from tidings.store.postgres.connection import (
    _CONNECTION_ERRORS,
    PostgresCore,
    _describe,
    _init_connection,
    _keep_session,
)
from tidings.store.postgres.leases import PostgresLeases
from tidings.store.postgres.projections import PostgresPersonalData, PostgresProjections
from tidings.store.postgres.reads import PostgresReading
from tidings.store.postgres.schema import PostgresSchema
from tidings.store.postgres.subscriptions import PostgresSubscriptions

__all__ = ["PostgresEventStore"]

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_OPTIONS: dict[str, type] = {  # tidings' own query parameters; the rest go to the server
    "max_event_size": int,
    "batch_size": int,
    "schema": str,
    "min_size": int,
    "max_size": int,
    "connect_timeout": float,
    "query_timeout": float,
    "create": bool,
    "listen": bool,
}


def _aware(moment: datetime) -> datetime:
    """A stored time; asyncpg reads `infinity` (written around tidings) as a naive
    `datetime.max`, which no aware time compares with: refused."""
    if moment.tzinfo is None:
        raise ValueError(f"recorded_at {moment} is not a time (infinity?)")
    return moment


class PostgresEventStore(
    PostgresAppending,
    PostgresSubscriptions,
    PostgresReading,
    PostgresProjections,
    PostgresPersonalData,
    PostgresLeases,
    PostgresSchema,
    PostgresCore,
):
    """An event store in PostgreSQL: `postgresql://user@host:port/db?schema=app`.

    Args:
        schema: the PostgreSQL schema holding the tables (created when missing), so several
            applications can share one database. Lower-case letters, digits and `_`.
        min_size / max_size: the connection pool's bounds.
        connect_timeout: seconds to wait for the server before failing with an error that
            names host and port.
        create: create the schema and tables when missing (default); False raises
            `StoreNotFound` instead, for tools that only read.
        listen: wake subscribers with LISTEN/NOTIFY (default); False polls only.
        query_timeout: seconds a query may take (30) before its connection is taken as lost
            and dropped: a link that stalls without a reset (a NAT or firewall that forgot
            it) fails the call, which is retried on a new connection, instead of hanging it.
            The LISTEN connection is checked as often. 0 waits for ever; migrations always do.
    """

    shared_across_processes = True
    _time_of = staticmethod(_aware)

    def __init__(
        self,
        url: str,
        *,
        codec: JSONCodec | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        batch_size: int = 1000,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        create: bool = True,
        listen: bool = True,
        query_timeout: float = 30.0,
    ) -> None:
        super().__init__(codec=codec, max_event_size=max_event_size, batch_size=batch_size)
        if not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(
                f"schema={schema!r}: use 1-63 lower-case letters, digits and _ (not first)"
            )
        if not query_timeout >= 0:
            raise ConfigurationError(f"query_timeout must be >= 0 seconds, got {query_timeout!r}")
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigurationError(f"pool sizes min_size={min_size}, max_size={max_size}")
        self.url = url
        self.dsn = _dsn(url)
        self.address = _address(self.dsn)
        self.schema = schema
        self._s = f'"{schema}"'
        self.channel = f"tidings_{schema}"
        self.min_size, self.max_size = min_size, max_size
        self.connect_timeout = connect_timeout
        self.create = create
        self.listen = listen
        self.query_timeout = query_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._held: Any = None  # a connection kept out of the pool, see `_connection`
        self._held_busy = False
        self._announce_wanted = False
        self._listening = False
        self._holes: dict[int, int] = {}  # first position of a hole -> guard transaction id
        self._skipped: set[int] = set()  # positions known never to be used
        self._young: dict[int, float] = {}  # a hole the reads stop at -> when first seen
        self._settled_to = 0  # every position up to it is committed or never will be

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresEventStore:
        """Build from a `postgresql://` URL; tidings' query parameters and keywords set the
        options, any other query parameter goes to the server as a setting."""
        ours = urlsplit(url)
        mine = "&".join(
            f"{k}={v}" for k, v in parse_qsl(ours.query, keep_blank_values=True) if k in _OPTIONS
        )
        parsed = url_options(urlunsplit(ours._replace(query=mine)), _OPTIONS)
        return cls(url, **(parsed | options))

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    init=_init_connection,
                    reset=_keep_session,
                    timeout=self.connect_timeout,
                    command_timeout=self.query_timeout or None,
                )
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {self.address} within "
                f"{self.connect_timeout:g}s: {_describe(exc)}"
            ) from exc
        self._pool = pool
        try:
            await self._prepare()
            if self.max_size > 1:  # else the pool's one connection would never come back
                self._held = await pool.acquire()
        except BaseException:
            await pool.close()
            raise

    async def _close(self) -> None:
        try:
            if self._announcer is not None:  # the last notification still goes out
                await asyncio.wait({self._announcer}, timeout=self.connect_timeout)
                self._announcer.cancel()  # (unless its link went silent)
                await asyncio.gather(self._announcer, return_exceptions=True)
            if self._listener_task is not None:
                self._listener_task.cancel()
                await asyncio.gather(self._listener_task, return_exceptions=True)
            connecting = self._connecting
            if connecting is not None and not connecting.done():
                # A listener connection still being opened (shielded from the cancel above):
                # let it arrive and close it, so no socket outlives the store.
                await asyncio.wait({connecting}, timeout=self.connect_timeout)
            if (
                connecting is not None
                and connecting.done()
                and not connecting.cancelled()
                and connecting.exception() is None
                and not connecting.result().is_closed()
            ):
                connecting.result().terminate()
            await asyncio.sleep(0)  # let an aborted transport finish closing
        finally:
            if self._pool is not None:
                await self._close_pool(self._pool)


def _address(dsn: str) -> str:
    """The host(s) and port(s) a DSN names, for messages: `db:5432`, or `h1:5432,h2:5433` for
    a multi-host URL (libpq's form, which asyncpg reads too: it tries each host in turn and,
    with `target_session_attrs=read-write`, keeps only a writable primary)."""
    hosts = urlsplit(dsn).netloc.rpartition("@")[2]
    found = []
    for host in (hosts or "localhost").split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            name, port = host, "5432"
        found.append(f"{name or 'localhost'}:{port}")
    return ",".join(found)


def _dsn(url: str) -> str:
    """The URL for asyncpg: `postgres(ql)://`, without tidings' own query parameters."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _OPTIONS])
    return urlunsplit(parts._replace(scheme="postgresql", query=query))
