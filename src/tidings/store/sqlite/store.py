"""`SQLiteEventStore`: the URL and options, opening and closing, the mixins assembled.

The concerns live beside it as mixins on `SQLiteCore` (`append`, `subscriptions`, `reads`,
`projections`, `leases`); this module assembles them into one class.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from tidings.core.codec import JSONCodec
from tidings.core.errors import ConfigurationError, StoreError, StoreNotFound
from tidings.core.ids import uuid_from_bytes
from tidings.store.base import DEFAULT_MAX_EVENT_SIZE, url_options
from tidings.store.sqlite.append import SQLiteAppending, _Append, _Job
from tidings.store.sqlite.connection import SQLiteCore, _mapped_errors
from tidings.store.sqlite.leases import SQLiteLeases
from tidings.store.sqlite.projections import SQLitePersonalData, SQLiteProjections
from tidings.store.sqlite.reads import SQLiteReading
from tidings.store.sqlite.schema import (
    _SYNCHRONOUS,
    MIGRATIONS,
    _from_micros,
    _migrate,
    _schema_version,
)
from tidings.store.sqlite.subscriptions import SQLiteSubscriptions, _shared_signal

__all__ = ["SQLiteEventStore"]


class SQLiteEventStore(
    SQLiteAppending,
    SQLiteSubscriptions,
    SQLiteReading,
    SQLiteProjections,
    SQLitePersonalData,
    SQLiteLeases,
    SQLiteCore,
):
    """An event store in one SQLite file: `sqlite:///relative.db` or `sqlite:////abs/path.db`.

    Args:
        synchronous: SQLite's `synchronous` pragma; `full` (default) makes every commit
            durable against power loss, `normal` only against a crash of the process.
        create: create the file and tables when missing (default); False raises
            `StoreNotFound` instead, for tools that only read.
        busy_timeout: milliseconds to wait for another process's write lock.
        readers: reader threads (and connections).
    """

    _id_of = staticmethod(uuid_from_bytes)
    _time_of = staticmethod(_from_micros)

    def __init__(
        self,
        url: str,
        *,
        codec: JSONCodec | None = None,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        batch_size: int = 1000,
        synchronous: str = "full",
        create: bool = True,
        busy_timeout: int = 5000,
        readers: int = 2,
    ) -> None:
        super().__init__(codec=codec, max_event_size=max_event_size, batch_size=batch_size)
        self.url = url
        self.path = _path_from_url(url)
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous={synchronous!r}; choose one of {', '.join(_SYNCHRONOUS)}"
            )
        self.synchronous = synchronous.lower()
        self.create = create
        self.busy_timeout = busy_timeout
        self.readers = max(1, readers)
        self._signal = _shared_signal(self.path)
        self._requests: queue.SimpleQueue[_Append | _Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self.commits = 0
        """Transactions committed by the writer; appends per commit shows group commit at work."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteEventStore:
        """Build from a `sqlite:///` URL; query parameters and keywords set the options."""
        known = {
            "max_event_size": int,
            "batch_size": int,
            "synchronous": str,
            "create": bool,
            "busy_timeout": int,
            "readers": int,
        }
        return cls(url, **(url_options(url, known) | options))

    # -- lifecycle -------------------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        writer_conn = await loop.run_in_executor(None, self._prepare)
        self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="tidings-sqlite-read")
        self._writer = threading.Thread(
            target=self._write_loop, args=(writer_conn,), name="tidings-sqlite-write", daemon=True
        )
        self._writer.start()

    async def _close(self) -> None:
        self._requests.put(None)
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            await loop.run_in_executor(None, self._writer.join)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for conn in self._connections:
            conn.close()
        self._connections.clear()

    def _prepare(self) -> sqlite3.Connection:
        """Open the writer connection, switch to WAL and migrate the schema (in a thread).

        With `create=False` nothing is changed in a file that holds no tidings tables, and a
        current schema is only read, never locked. Several processes opening one new file at
        once can find it locked in ways SQLite does not wait for (the switch to WAL, a
        recovery): that is tried again, for up to `busy_timeout`.
        """
        deadline = time.monotonic() + self.busy_timeout / 1000
        pause = 0.01
        while True:
            try:
                return self._prepare_once()
            except StoreError as exc:
                cause = exc.__cause__
                locked = isinstance(cause, sqlite3.OperationalError) and (
                    "locked" in str(cause) or "busy" in str(cause)
                )
                if not locked or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _prepare_once(self) -> sqlite3.Connection:
        if not self.create and not os.path.exists(self.path):
            raise StoreNotFound(self.path)
        with _mapped_errors(self.path):
            conn = self._connect(writer=True)
            try:
                current = _schema_version(conn)
                if current is None and not self.create:
                    raise StoreNotFound(f"{self.path} (it holds no tidings tables)")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"sqlite ({self.path}): cannot use WAL (journal_mode={mode})")
                if current is None or current < MIGRATIONS[-1][0]:
                    _migrate(conn)
            except BaseException:
                conn.close()
                raise
        return conn


def _path_from_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(
            f"{url!r} has a host part {parts.netloc!r}; write sqlite:///relative.db "
            "or sqlite:////absolute/path.db (three or four slashes)"
        )
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    if not path or path == ":memory:":
        raise ConfigurationError(f"{url!r} names no file; for a store in memory use 'memory://'")
    if "\x00" in path:  # no file name holds one (a %00 in the URL)
        raise ConfigurationError(f"{url!r}: a file name cannot hold a NUL character")
    return path
