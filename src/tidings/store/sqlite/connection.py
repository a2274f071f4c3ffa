"""`SQLiteCore`: what every part of the SQLite store builds on.

It declares the state `SQLiteEventStore.__init__` sets up and hands out connections: opening
one with its pragmas, the reader threads' connections (`_run`) and the caller's own for small
reads (`_inline`), with driver errors translated. Writes go through the writer thread
(`_write`, in `append`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

from tidings.core.errors import StoreClosed, StoreError, TidingsError
from tidings.store.base import StoreBase

T = TypeVar("T")


class SQLiteCore(StoreBase):
    """The state and connections shared by every concern of the SQLite store."""

    # Set by `SQLiteEventStore.__init__` and `_open`.
    path: str
    create: bool
    busy_timeout: int
    synchronous: str
    _pool: ThreadPoolExecutor | None
    _local: threading.local
    _connections: list[sqlite3.Connection]

    if TYPE_CHECKING:

        async def _write(self, work: Callable[[sqlite3.Connection, int], T]) -> T: ...  # append

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        if self.create:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            uri = "file:" + _quote_path(self.path) + "?mode=rw"
            conn = sqlite3.connect(uri, isolation_level=None, check_same_thread=False, uri=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if writer:
            conn.execute("PRAGMA secure_delete = ON")  # a forgotten key leaves no bytes behind
        else:
            conn.execute("PRAGMA query_only = 1")
        return conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` with this thread's reader connection on the reader pool."""
        self._check_open()
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._with_reader, work)
        except RuntimeError as exc:
            if self._closed:
                raise StoreClosed("the store was closed during a read") from exc
            raise

    def _inline(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run a small indexed read right here, on this thread's own reader connection.

        A handful of rows by primary key costs a few microseconds, less than handing it to
        a reader thread and back; in WAL mode a read never waits for a writer. Scans and
        big batches still go to the reader threads (`_run`).
        """
        self._check_open()
        return self._with_reader(work)

    def _with_reader(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        with _mapped_errors(self.path):
            if conn is None:
                conn = self._local.conn = self._connect(writer=False)
                self._connections.append(conn)
            return work(conn)


@contextmanager
def _mapped_errors(path: str) -> Iterator[None]:
    """Translate sqlite3 errors into tidings errors, in one place."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"sqlite ({path}): {exc}") from exc


def _as_tidings_error(exc: Exception, path: str) -> Exception:
    if isinstance(exc, TidingsError):
        return exc
    error = StoreError(f"sqlite ({path}): {exc}")
    error.__cause__ = exc
    return error


def _quote_path(path: str) -> str:
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
