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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from tidings.core.codec import EncodedEvent, JSONCodec
from tidings.core.errors import (
    ConfigurationError,
    StoreClosed,
    StoreError,
    StoreNotFound,
    WrongExpectedVersion,
)
from tidings.core.personal import new_key
from tidings.store.base import (
    ANY,
    DEFAULT_MAX_EVENT_SIZE,
    STREAM_EXISTS,
    AppendResult,
    DocumentNotLoaded,
    ExpectedVersion,
    ProjectionState,
    Row,
    Snapshot,
    StoreBase,
    StreamInfo,
    advance_projection,
    begin_rebuild,
    resolve_duplicates,
    swap_rebuild,
    url_options,
)

__all__ = ["PostgresEventStore"]

log = logging.getLogger("tidings.store.postgres")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
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
_COLUMNS = "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata"
_EXPECTED_CODES = {ANY: -1, STREAM_EXISTS: -2}
_APPEND_ATTEMPTS = 2  # a lost connection is retried once with the same ids (idempotent)
_NO_TIMEOUT = 86_400.0  # seconds: the query_timeout of a migration (a day: none, in effect)
_SAFETY_POLL = 5.0  # seconds between reads of a listening subscriber with nothing to do
_NOTIFY_DELAY = 0.002  # seconds a notification waits to carry the appends that follow it


def _migrations(schema: str) -> list[tuple[int, list[str]]]:
    """The tables, version by version, in `schema` (a validated identifier)."""
    s = f'"{schema}"'
    return [
        (
            1,
            [
                f"CREATE SEQUENCE {s}.tidings_positions AS bigint",
                f"""CREATE TABLE {s}.tidings_events (
                    position       bigint      PRIMARY KEY,
                    id             uuid        NOT NULL UNIQUE,
                    stream_id      bytea       NOT NULL,
                    version        bigint      NOT NULL,
                    type           text        NOT NULL,
                    schema_version integer     NOT NULL,
                    recorded_at    timestamptz NOT NULL,
                    data           text        NOT NULL,
                    metadata       text,
                    UNIQUE (stream_id, version)
                )""",
                f"""CREATE TABLE {s}.tidings_streams (
                    stream_id bytea  PRIMARY KEY,
                    version   bigint NOT NULL
                )""",
                f"""CREATE FUNCTION {s}.tidings_append(
                    p_stream bytea, p_expected bigint, p_ids uuid[], p_types text[],
                    p_schema_versions integer[], p_data text[], p_metadata text
                ) RETURNS TABLE (ok boolean, version bigint, last_position bigint)
                LANGUAGE plpgsql AS $$
                DECLARE
                    v_actual bigint;
                    v_count integer := cardinality(p_ids);
                    v_positions bigint[];
                BEGIN
                    -- The transaction id first: a reader's hole check relies on every writer
                    -- holding its id before it draws a position.
                    PERFORM pg_current_xact_id();
                    SELECT s.version INTO v_actual FROM {s}.tidings_streams s
                        WHERE s.stream_id = p_stream FOR UPDATE;
                    IF NOT FOUND THEN
                        INSERT INTO {s}.tidings_streams (stream_id, version)
                            VALUES (p_stream, 0) ON CONFLICT DO NOTHING;
                        SELECT s.version INTO v_actual FROM {s}.tidings_streams s
                            WHERE s.stream_id = p_stream FOR UPDATE;
                    END IF;
                    -- A clash or a retry of stored events returns before drawing positions,
                    -- so neither leaves a hole in the log.
                    IF NOT (p_expected = -1 OR (p_expected = -2 AND v_actual > 0)
                            OR p_expected = v_actual)
                       OR EXISTS (SELECT 1 FROM {s}.tidings_events e WHERE e.id = ANY(p_ids))
                    THEN
                        RETURN QUERY SELECT false, v_actual, 0::bigint;
                        RETURN;
                    END IF;
                    IF v_count = 1 THEN
                        v_positions := ARRAY[nextval('{s}.tidings_positions')];
                    ELSE
                        SELECT array_agg(p ORDER BY p) INTO v_positions FROM (
                            SELECT nextval('{s}.tidings_positions') AS p
                            FROM generate_series(1, v_count)
                        ) drawn;
                    END IF;
                    INSERT INTO {s}.tidings_events (position, id, stream_id, version, type,
                        schema_version, recorded_at, data, metadata)
                    SELECT v_positions[t.n], t.id, p_stream, v_actual + t.n, t.type, t.sv,
                        now(), t.data, p_metadata
                    FROM unnest(p_ids, p_types, p_schema_versions, p_data)
                        WITH ORDINALITY AS t(id, type, sv, data, n);
                    UPDATE {s}.tidings_streams SET version = v_actual + v_count
                        WHERE stream_id = p_stream;
                    RETURN QUERY SELECT true, v_actual + v_count, v_positions[v_count];
                END
                $$""",
            ],
        ),
        (
            2,
            [
                f"""CREATE TABLE {s}.tidings_snapshots (
                    stream_id      bytea       NOT NULL,
                    version        bigint      NOT NULL,
                    type           text        NOT NULL,
                    schema_version integer     NOT NULL,
                    recorded_at    timestamptz NOT NULL,
                    data           text        NOT NULL,
                    PRIMARY KEY (stream_id, version)
                )""",
                f"""CREATE TABLE {s}.tidings_projections (
                    name                text        PRIMARY KEY,
                    generation          integer     NOT NULL,
                    position            bigint      NOT NULL,
                    updated_at          timestamptz NOT NULL,
                    building_generation integer,
                    building_position   bigint      NOT NULL DEFAULT 0
                )""",
                f"""CREATE TABLE {s}.tidings_documents (
                    projection text    NOT NULL,
                    generation integer NOT NULL,
                    key        bytea   NOT NULL,
                    doc        text    NOT NULL,
                    PRIMARY KEY (projection, generation, key)
                )""",
            ],
        ),
        (
            3,
            [
                f"""CREATE TABLE {s}.tidings_leases (
                    name       text        PRIMARY KEY,
                    owner      text        NOT NULL,
                    expires_at timestamptz NOT NULL
                )""",
            ],
        ),
        (
            4,
            [
                f"""CREATE TABLE {s}.tidings_subject_keys (
                    subject text PRIMARY KEY,
                    key     text NOT NULL  -- hex; this store's connections read bytea as text
                )""",
            ],
        ),
        (
            5,
            [  # `tidings trace`: one correlation's events without a scan of the log
                f"""CREATE INDEX tidings_events_correlation ON {s}.tidings_events
                    (((metadata::jsonb) ->> 'correlation_id'), position)
                    WHERE metadata IS NOT NULL""",
            ],
        ),
    ]


def _aware(moment: datetime) -> datetime:
    """A stored time; asyncpg reads `infinity` (written around tidings) as a naive
    `datetime.max`, which no aware time compares with: refused."""
    if moment.tzinfo is None:
        raise ValueError(f"recorded_at {moment} is not a time (infinity?)")
    return moment


class PostgresEventStore(StoreBase):
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
        parts = urlsplit(self.dsn)
        self.address = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
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
            self._held = await pool.acquire()
        except BaseException:
            await pool.close()
            raise

    async def _prepare(self) -> None:
        """Create or migrate the schema: one process migrates, the others wait, then see it."""
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            current = await _schema_version(conn, self.schema)  # (under query_timeout)
            migrations = _migrations(self.schema)
            if current is not None and current >= migrations[-1][0]:
                return
            if not self.create:
                raise StoreNotFound(
                    f"PostgreSQL {self.address} schema {self.schema!r} (no tidings tables)"
                )
            async with conn.transaction():
                # Another process's migration, or this one, may take long: no query_timeout.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    f"tidings:{self.schema}",
                    timeout=_NO_TIMEOUT,
                )
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}", timeout=_NO_TIMEOUT)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._s}.tidings_schema (version integer)",
                    timeout=_NO_TIMEOUT,
                )
                current = await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {self._s}.tidings_schema",
                    timeout=_NO_TIMEOUT,
                )
                for version, statements in migrations:
                    if version > current:
                        for statement in statements:
                            await conn.execute(statement, timeout=_NO_TIMEOUT)
                        await conn.execute(
                            f"INSERT INTO {self._s}.tidings_schema (version) VALUES ($1)",
                            version,
                            timeout=_NO_TIMEOUT,
                        )

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

    # -- LISTEN/NOTIFY ---------------------------------------------------------------------

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

    # -- writing ---------------------------------------------------------------------------

    async def _append(
        self,
        stream_id: str,
        expected: ExpectedVersion,
        events: list[EncodedEvent],
        metadata: str | None,
    ) -> AppendResult:
        code = expected if isinstance(expected, int) else _EXPECTED_CODES[expected]
        ids = [e.id for e in events]
        args = (
            stream_id,
            code,
            ids,
            [e.type for e in events],
            [e.schema_version for e in events],
            [e.data for e in events],
            metadata,
        )
        sql = (
            "SELECT ok, version, last_position "
            f"FROM {self._s}.tidings_append($1, $2, $3, $4, $5, $6, $7)"
        )
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                async with self._connection() as conn:
                    try:
                        ok, version, position = await conn.fetchrow(sql, *args)
                    except asyncpg.UniqueViolationError:
                        found = await self._find_ids(conn, ids)
                        if not found:
                            raise
                        return resolve_duplicates(stream_id, ids, found)
                    if ok:
                        self._announce()
                        return AppendResult(version=version, position=position)
                    found = await self._find_ids(conn, ids)
                    if found:
                        return resolve_duplicates(stream_id, ids, found)
                    raise WrongExpectedVersion(stream_id, expected, version)
            except StoreError as exc:
                if attempt == _APPEND_ATTEMPTS or not isinstance(exc.__cause__, _CONNECTION_ERRORS):
                    raise StoreError(
                        f"{exc}; the append to {stream_id!r} may or may not have committed: "
                        "retry it with the same events (same ids) to find out safely"
                    ) from exc.__cause__
                log.warning(
                    "append to %r lost its connection; retrying with the same ids", stream_id
                )
        raise AssertionError("unreachable")

    async def _find_ids(self, conn: Any, ids: list[Any]) -> dict[Any, tuple[str, int, int]]:
        rows = await conn.fetch(
            f"SELECT id, stream_id, version, position FROM {self._s}.tidings_events "
            "WHERE id = ANY($1::uuid[])",
            ids,
        )
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    # -- reading ---------------------------------------------------------------------------

    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        order, compare = ("DESC", "<=") if backwards else ("ASC", ">=")
        async with self._connection() as conn:
            rows: list[Row] = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._s}.tidings_events WHERE stream_id = $1 "
                f"AND version {compare} $2 ORDER BY version {order} LIMIT $3",
                stream_id,
                from_version,
                limit,
            )
        return rows

    async def _read_all_batch(
        self, after: int, limit: int, types: frozenset[str] | None
    ) -> tuple[list[Row], int]:
        async with self._connection() as conn:
            for _ in range(3):  # a closed hole is read again at once, a few times at most
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM {self._s}.tidings_events WHERE position > $1 "
                    "ORDER BY position LIMIT $2",
                    after,
                    limit,
                )
                accepted, scanned, retry = await self._up_to_first_hole(conn, rows, after)
                if not retry:
                    break
            if types is not None:
                accepted = [row for row in accepted if row[4] in types]
        return accepted, scanned

    async def _correlation_rows(self, correlation_id: str, limit: int) -> list[Row]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM {self._s}.tidings_events WHERE metadata IS NOT NULL "
                "AND (metadata::jsonb) ->> 'correlation_id' = $1 ORDER BY position LIMIT $2",
                correlation_id,
                limit,
            )
        return list(rows)

    async def _up_to_first_hole(
        self, conn: Any, rows: list[Any], after: int
    ) -> tuple[list[Row], int, bool]:
        """The rows before the first open hole, the position reached, and whether a hole
        just turned out to be filled (so reading again now gets further)."""
        for start in [start for start in self._holes if start <= after]:
            del self._holes[start]  # passed; a reader behind takes a fresh guard if it meets it
        accepted: list[Row] = []
        expected = after + 1
        for row in rows:
            position = row[0]
            while position > expected:
                if expected in self._skipped:
                    expected += 1
                    continue
                state = await self._hole_state(conn, expected, position - 1)
                if state == "open":
                    return accepted, expected - 1, False
                if state == "filled":
                    return accepted, expected - 1, True
                expected = position  # the whole gap is permanent
            accepted.append(row)
            self._holes.pop(position, None)
            expected = position + 1
        return accepted, expected - 1, False

    async def _hole_state(self, conn: Any, start: int, end: int) -> str:
        """`open` (a writer may still commit into it), `filled` (it committed since), or
        `closed` (every writer that could have drawn these positions has ended)."""
        guard = self._holes.get(start)
        if guard is None:
            # An id assigned now is above that of any writer that drew these positions.
            guard = self._holes[start] = int(
                await conn.fetchval("SELECT pg_current_xact_id()::text")
            )
        oldest = int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
        if oldest <= guard:
            return "open"
        self._holes.pop(start, None)  # another reader of this store may have closed it too
        found = await conn.fetchval(
            f"SELECT count(*) FROM {self._s}.tidings_events WHERE position BETWEEN $1 AND $2",
            start,
            end,
        )
        if found:
            return "filled"
        self._skipped.update(range(start, end + 1))
        return "closed"

    async def _stream_version(self, stream_id: str) -> int:
        async with self._connection() as conn:
            version = await conn.fetchval(
                f"SELECT version FROM {self._s}.tidings_streams WHERE stream_id = $1", stream_id
            )
        return int(version or 0)

    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT stream_id, version FROM {self._s}.tidings_streams "
                "WHERE stream_id > $1 AND version > 0 ORDER BY stream_id LIMIT $2",
                after,
                limit,
            )
        return [StreamInfo(stream_id, version) for stream_id, version in rows]

    async def _last_position(self) -> int:
        async with self._connection() as conn:
            found = await conn.fetchval(
                f"SELECT coalesce(max(position), 0) FROM {self._s}.tidings_events"
            )
        return int(found)

    # -- snapshots -------------------------------------------------------------------------

    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.tidings_snapshots (stream_id, version, type, "
                "schema_version, recorded_at, data) VALUES ($1, $2, $3, $4, now(), $5) "
                "ON CONFLICT (stream_id, version) DO UPDATE SET type = excluded.type, "
                "schema_version = excluded.schema_version, recorded_at = excluded.recorded_at, "
                "data = excluded.data",
                stream_id,
                version,
                type,
                schema_version,
                data,
            )

    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT stream_id, version, type, schema_version, recorded_at, data "
                f"FROM {self._s}.tidings_snapshots WHERE stream_id = $1 "
                "AND ($2::bigint IS NULL OR version <= $2) "
                "AND ($3::timestamptz IS NULL OR recorded_at <= $3) "
                "ORDER BY version DESC LIMIT 1",
                stream_id,
                max_version,
                recorded_until,
            )
        return None if row is None else Snapshot(*row)

    # -- projections -----------------------------------------------------------------------

    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        async with self._connection() as conn:
            if name is None:
                rows = await conn.fetch(f"SELECT {self._projection_columns()} ORDER BY name")
            else:
                rows = await conn.fetch(
                    f"SELECT {self._projection_columns()} WHERE name = $1", name
                )
        return [ProjectionState(*row) for row in rows]

    def _projection_columns(self) -> str:
        return (
            "name, generation, position, updated_at, building_generation, building_position "
            f"FROM {self._s}.tidings_projections"
        )

    async def _locked_projection(self, conn: Any, name: str) -> ProjectionState | None:
        row = await conn.fetchrow(
            f"SELECT {self._projection_columns()} WHERE name = $1 FOR UPDATE", name
        )
        return None if row is None else ProjectionState(*row)

    async def _save_projection(self, conn: Any, state: ProjectionState) -> None:
        await conn.execute(
            f"INSERT INTO {self._s}.tidings_projections (name, generation, position, updated_at, "
            "building_generation, building_position) VALUES ($1, $2, $3, now(), $4, $5) "
            "ON CONFLICT (name) DO UPDATE SET generation = excluded.generation, "
            "position = excluded.position, updated_at = excluded.updated_at, "
            "building_generation = excluded.building_generation, "
            "building_position = excluded.building_position",
            state.name,
            state.generation,
            state.position,
            state.building_generation,
            state.building_position,
        )

    @asynccontextmanager
    async def _projection_transaction(self, name: str) -> Any:
        """A transaction holding the projection's checkpoint row (or its absence) locked."""
        async with self._connection() as conn, conn.transaction():
            # Serialises first commits too, when there is no row to lock yet.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"tidings:{self.schema}:{name}"
            )
            yield conn, await self._locked_projection(conn, name)

    async def _commit_projection(
        self,
        name: str,
        generation: int,
        expected_position: int,
        position: int,
        writes: Mapping[str, str | None],
    ) -> None:
        upserts = [(key, doc) for key, doc in writes.items() if doc is not None]
        deletes = [key for key, doc in writes.items() if doc is None]
        async with self._projection_transaction(name) as (conn, current):
            now = await conn.fetchval("SELECT now()")
            state = advance_projection(current, name, generation, expected_position, position, now)
            if upserts:
                await conn.execute(
                    f"INSERT INTO {self._s}.tidings_documents (projection, generation, key, doc) "
                    "SELECT $1, $2, k, d FROM unnest($3::bytea[], $4::text[]) AS t(k, d) "
                    "ON CONFLICT (projection, generation, key) DO UPDATE SET doc = excluded.doc",
                    name,
                    generation,
                    [key for key, _ in upserts],
                    [doc for _, doc in upserts],
                )
            if deletes:
                await conn.execute(
                    f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                    "AND generation = $2 AND key = ANY($3::bytea[])",
                    name,
                    generation,
                    deletes,
                )
            await self._save_projection(conn, state)

    async def _start_rebuild(self, name: str) -> ProjectionState:
        async with self._projection_transaction(name) as (conn, current):
            state = begin_rebuild(current, name, await conn.fetchval("SELECT now()"))
            await conn.execute(  # what an aborted rebuild left behind
                f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                "AND generation <> $2",
                name,
                state.generation,
            )
            await self._save_projection(conn, state)
        return state

    async def _finish_rebuild(self, name: str, generation: int) -> None:
        async with self._projection_transaction(name) as (conn, current):
            state = swap_rebuild(current, name, generation, await conn.fetchval("SELECT now()"))
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_documents WHERE projection = $1 "
                "AND generation <> $2",
                name,
                generation,
            )
            await self._save_projection(conn, state)

    def _live_generation(self) -> str:
        return (
            f"coalesce($2::integer, (SELECT generation FROM {self._s}.tidings_projections "
            "WHERE name = $1), 0)"
        )

    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT key, doc FROM {self._s}.tidings_documents WHERE projection = $1 "
                f"AND generation = {self._live_generation()} AND key = ANY($3::bytea[])",
                name,
                generation,
                list(keys),
            )
        return {key: doc for key, doc in rows}

    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT key, doc FROM {self._s}.tidings_documents WHERE projection = $1 "
                f"AND generation = {self._live_generation()} AND key > $3 ORDER BY key LIMIT $4",
                name,
                generation,
                after,
                limit,
            )
        return [(key, doc) for key, doc in rows]

    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        return _DocumentCache(self, name, generation)

    # -- leases ----------------------------------------------------------------------------

    # -- personal data ---------------------------------------------------------------------

    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        wanted = sorted(subjects)
        async with self._connection() as conn:
            if create:
                await conn.execute(
                    f"INSERT INTO {self._s}.tidings_subject_keys (subject, key) "
                    "SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                    wanted,
                    [new_key().hex() for _ in wanted],
                )
            rows = await conn.fetch(
                f"SELECT subject, key FROM {self._s}.tidings_subject_keys "
                "WHERE subject = ANY($1::text[])",
                wanted,
            )
        return {row[0]: bytes.fromhex(row[1]) for row in rows}

    async def _forget(self, subject: str) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_subject_keys WHERE subject = $1", subject
            )
            await conn.execute(f"DELETE FROM {self._s}.tidings_snapshots")

    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        async with self._connection() as conn:
            holder = await conn.fetchval(
                f"INSERT INTO {self._s}.tidings_leases (name, owner, expires_at) "
                "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                f"WHERE {self._s}.tidings_leases.owner = excluded.owner "
                f"OR {self._s}.tidings_leases.expires_at < now() "
                "RETURNING owner",
                name,
                owner,
                ttl,
            )
        return bool(holder == owner)

    async def _release_lease(self, name: str, owner: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"DELETE FROM {self._s}.tidings_leases WHERE name = $1 AND owner = $2",
                name,
                owner,
            )


class _DocumentCache:
    """Document lookups for one batch: PostgreSQL can only be read with `await`, so a key not
    loaded yet raises `DocumentNotLoaded`; the projection loads it and runs the event again."""

    def __init__(self, store: PostgresEventStore, name: str, generation: int) -> None:
        self.store = store
        self.name = name
        self.generation = generation
        self.loaded: dict[str, str | None] = {}

    def __call__(self, key: str) -> str | None:
        try:
            return self.loaded[key]
        except KeyError:
            raise DocumentNotLoaded(key) from None

    async def load(self, keys: Sequence[str]) -> None:
        found = await self.store._get_documents(self.name, self.generation, keys)
        for key in keys:
            self.loaded[key] = found.get(key)


def _unusable(conn: Any) -> bool:
    """Whether a held pool connection broke (the pool may already have taken it back)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    def set_it(_conn: Any) -> None:
        event.set()

    return set_it


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


async def _schema_version(conn: Any, schema: str) -> int | None:
    exists = await conn.fetchval(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = $1 "
        "AND table_name = 'tidings_schema'",
        schema,
    )
    if not exists:
        return None
    found = await conn.fetchval(f'SELECT coalesce(max(version), 0) FROM "{schema}".tidings_schema')
    return int(found)


async def _quietly_close(conn: Any) -> None:
    try:
        async with asyncio.timeout(2.0):
            await conn.close()
    except Exception:
        conn.terminate()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _dsn(url: str) -> str:
    """The URL for asyncpg: `postgres(ql)://`, without tidings' own query parameters."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in _OPTIONS])
    return urlunsplit(parts._replace(scheme="postgresql", query=query))
