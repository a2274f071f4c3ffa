"""The inbox: a handler's database writes and the id of the event it handled, in one
transaction, so a redelivered event has no second effect.

Brokers deliver at least once; a relay may publish an event twice after a crash. A handler
given an inbox runs inside a transaction on the inbox's database that first records
`(consumer, event id)`; when that id is already there the handler is skipped and the message
acked. The handler writes its own tables through `ctx.db`, the same connection, so its
effects and the processed id commit (or roll back) together.

```python
inbox = open_inbox("sqlite:///analytics.db")     # or "postgresql://.../db?schema=analytics"

@service.handler("orders", inbox=inbox)
async def keep_copy(event: OrderPlaced, ctx: Context) -> None:
    ctx.db.execute("insert into orders values (?, ?)", (event.order_id, event.total))
```

`ctx.db` is a `sqlite3.Connection` (synchronous calls; one handler at a time) or an
`asyncpg.Connection` (await its calls), inside the open transaction: do not commit it.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from tidings.core.errors import ConfigurationError, StoreClosed
from tidings.core.lifecycle import AsyncResource

if TYPE_CHECKING:
    import sqlite3

__all__ = ["Inbox", "PostgresInbox", "SQLiteInbox", "open_inbox"]

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CLOSE_TIMEOUT = 10.0  # seconds a graceful close of the PostgreSQL pool may take


class Inbox(AsyncResource, ABC):
    """Processed event ids, committed with a handler's writes.

    A handler given an inbox runs in a transaction that first records `(group, event id)`;
    an id already there skips the handler. Its writes go through `ctx.db` and commit with it.
    """

    def __init__(self, table: str = "tidings_inbox") -> None:
        if not _TABLE.match(table):
            raise ConfigurationError(f"inbox table {table!r} is not a plain SQL name")
        self.table = table
        self.opened = False

    async def open(self) -> Self:
        """Connect and create the inbox table if missing (again after `aclose`)."""
        if not self.opened:
            await self._open()
            self.opened = True
        return self

    async def aclose(self) -> None:
        if self.opened:
            self.opened = False
            await self._close()

    @abstractmethod
    def transaction(self, consumer: str, event_id: str) -> Any:
        """`async with inbox.transaction(consumer, id) as db:` the connection inside a new
        transaction that has recorded `id` for `consumer`, or None (and nothing to do) when
        it was processed before. Leaving the block commits; an exception rolls back."""

    @abstractmethod
    async def processed(self, consumer: str) -> int:
        """How many event ids `consumer` has processed."""

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    def _check_open(self) -> None:
        if not self.opened:
            raise StoreClosed(f"{type(self).__name__} is not open")


class SQLiteInbox(Inbox):
    """An inbox in a SQLite file (WAL), on one connection used from the event loop.

    Handlers on one SQLite inbox run their transactions one at a time (SQLite has one
    writer anyway); each is a short local write, so it runs inline rather than in a thread.
    """

    def __init__(self, path: str | Path, *, table: str = "tidings_inbox") -> None:
        super().__init__(table)
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        import sqlite3  # here: `import tidings` loads no driver

        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("pragma journal_mode=wal")
        conn.execute("pragma synchronous=normal")
        conn.execute("pragma busy_timeout=5000")
        conn.execute(
            f"create table if not exists {self.table} (consumer text not null, "
            "event_id text not null, processed_at text not null, "
            "primary key (consumer, event_id)) without rowid"
        )
        self._conn = conn

    async def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @asynccontextmanager
    async def transaction(
        self, consumer: str, event_id: str
    ) -> AsyncIterator[sqlite3.Connection | None]:
        self._check_open()
        conn = self._conn
        assert conn is not None
        async with self._lock:
            conn.execute("begin immediate")
            try:
                cursor = conn.execute(
                    f"insert or ignore into {self.table} values (?, ?, ?)",
                    (consumer, event_id, datetime.now(UTC).isoformat()),
                )
                yield conn if cursor.rowcount == 1 else None
                conn.execute("commit")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("rollback")
                raise

    async def processed(self, consumer: str) -> int:
        self._check_open()
        assert self._conn is not None
        row = self._conn.execute(
            f"select count(*) from {self.table} where consumer = ?", (consumer,)
        ).fetchone()
        return int(row[0])


class PostgresInbox(Inbox):
    """An inbox in PostgreSQL (asyncpg pool); `?schema=NAME` puts its table there.

    `query_timeout` (seconds, 30; 0 waits for ever; `?query_timeout=`) bounds every query
    on the inbox's connections, the handler's own included (asyncpg's `command_timeout`;
    pass `timeout=` to one query for more): a link that stalls without a reset fails the
    attempt with `TimeoutError`, the connection is dropped, and the message comes again.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = "tidings_inbox",
        schema: str | None = None,
        query_timeout: float = 30.0,
    ) -> None:
        super().__init__(table)
        if schema is not None and not _TABLE.match(schema):
            raise ConfigurationError(f"schema {schema!r} is not a plain SQL name")
        if not query_timeout >= 0:
            raise ConfigurationError(f"query_timeout must be >= 0 seconds, got {query_timeout!r}")
        self.url = url
        self.schema = schema
        self.query_timeout = query_timeout
        self._pool: Any = None

    async def _open(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        settings = {"search_path": self.schema} if self.schema else {}
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=4,
            server_settings=settings,
            command_timeout=self.query_timeout or None,
        )
        async with self._pool.acquire() as conn:
            if self.schema:
                await conn.execute(f"create schema if not exists {self.schema}")
            await conn.execute(
                f"create table if not exists {self.table} (consumer text not null, "
                "event_id text not null, processed_at timestamptz not null default now(), "
                "primary key (consumer, event_id))"
            )

    async def _close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:  # gracefully, unless a link went silent: then every connection is dropped
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    @asynccontextmanager
    async def transaction(self, consumer: str, event_id: str) -> AsyncIterator[Any]:
        self._check_open()
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    fresh = await conn.fetchval(
                        f"insert into {self.table} (consumer, event_id) values ($1, $2) "
                        "on conflict do nothing returning true",
                        consumer,
                        event_id,
                    )
                    yield conn if fresh else None
            except TimeoutError:
                conn.terminate()  # its link may be stalled: never reused (the pool makes another)
                raise

    async def processed(self, consumer: str) -> int:
        self._check_open()
        async with self._pool.acquire() as conn:
            count = await conn.fetchval(
                f"select count(*) from {self.table} where consumer = $1", consumer
            )
        return int(count)


def open_inbox(url: str, *, table: str = "tidings_inbox") -> Inbox:
    """The inbox for `url`: `sqlite:///path.db` or
    `postgresql://…[?schema=NAME][&query_timeout=SECONDS]`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ConfigurationError(f"an SQLite inbox URL names a file: {url!r}")
        return SQLiteInbox(path, table=table)
    if scheme in ("postgresql", "postgres"):
        options = dict(parse_qsl(parts.query))
        schema = options.pop("schema", None)
        timeout = options.pop("query_timeout", "30")
        try:
            query_timeout = float(timeout)
        except ValueError:
            raise ConfigurationError(
                f"query_timeout={timeout!r} in {url!r} is not a number of seconds"
            ) from None
        rest = "&".join(f"{k}={v}" for k, v in options.items())
        return PostgresInbox(
            urlunsplit(parts._replace(query=rest)),
            table=table,
            schema=schema,
            query_timeout=query_timeout,
        )
    raise ConfigurationError(
        f"unknown inbox URL {url!r}; an inbox lives in sqlite:///… or postgresql://…"
    )
