"""`SQLiteEventStore`: the embedded default, one file, WAL, no server.

One writer thread owns the write connection and commits appends in groups: every append
waiting when a commit starts joins it, each checked against its own expected version inside a
savepoint, so one failing append never takes others with it, and a hundred appends share one
fsync. Scans run on a small pool of reader threads, each with its own connection; lookups by
key and short stream reads run inline on the loop's own read-only connection (microseconds,
less than a thread hand-off); rows are decoded on the loop. Other processes may write the same
file; their appends reach this process's subscribers by polling.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

from tidings.core.codec import EncodedEvent, JSONCodec
from tidings.core.errors import (
    ConfigurationError,
    StoreClosed,
    StoreError,
    StoreNotFound,
    TidingsError,
    WrongExpectedVersion,
)
from tidings.core.ids import uuid_from_bytes
from tidings.core.personal import new_key
from tidings.store.base import (
    DEFAULT_MAX_EVENT_SIZE,
    AppendResult,
    AppendSignal,
    ExpectedVersion,
    ProjectionState,
    Row,
    Snapshot,
    StoreBase,
    StreamInfo,
    advance_projection,
    begin_rebuild,
    expected_matches,
    resolve_duplicates,
    swap_rebuild,
    url_options,
)

__all__ = ["SQLiteEventStore"]

T = TypeVar("T")

# -- schema -------------------------------------------------------------------------------

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE tidings_events (
                position       INTEGER PRIMARY KEY,
                id             BLOB    NOT NULL UNIQUE,
                stream_id      TEXT    NOT NULL,
                version        INTEGER NOT NULL,
                type           TEXT    NOT NULL,
                schema_version INTEGER NOT NULL,
                recorded_at    INTEGER NOT NULL,  -- microseconds since the Unix epoch, UTC
                data           TEXT    NOT NULL,
                metadata       TEXT,
                UNIQUE (stream_id, version)
            )""",
            """CREATE TABLE tidings_streams (
                stream_id TEXT PRIMARY KEY,
                version   INTEGER NOT NULL
            ) WITHOUT ROWID""",
        ],
    ),
    (
        2,
        [
            """CREATE TABLE tidings_snapshots (
                stream_id      TEXT    NOT NULL,
                version        INTEGER NOT NULL,
                type           TEXT    NOT NULL,
                schema_version INTEGER NOT NULL,
                recorded_at    INTEGER NOT NULL,
                data           TEXT    NOT NULL,
                PRIMARY KEY (stream_id, version)
            ) WITHOUT ROWID""",
            """CREATE TABLE tidings_projections (
                name                TEXT    PRIMARY KEY,
                generation          INTEGER NOT NULL,
                position            INTEGER NOT NULL,
                updated_at          INTEGER NOT NULL,
                building_generation INTEGER,
                building_position   INTEGER NOT NULL DEFAULT 0
            ) WITHOUT ROWID""",
            """CREATE TABLE tidings_documents (
                projection TEXT    NOT NULL,
                generation INTEGER NOT NULL,
                key        TEXT    NOT NULL,
                doc        TEXT    NOT NULL,
                PRIMARY KEY (projection, generation, key)
            ) WITHOUT ROWID""",
        ],
    ),
    (
        3,
        [
            """CREATE TABLE tidings_leases (
                name       TEXT    PRIMARY KEY,
                owner      TEXT    NOT NULL,
                expires_at INTEGER NOT NULL  -- microseconds since the Unix epoch
            ) WITHOUT ROWID""",
        ],
    ),
    (
        4,
        [
            """CREATE TABLE tidings_subject_keys (
                subject TEXT PRIMARY KEY,
                key     BLOB NOT NULL  -- AES-256-GCM key of the subject's personal fields
            ) WITHOUT ROWID""",
        ],
    ),
    (
        5,
        [  # `tidings trace`: one correlation's events without a scan of the log
            """CREATE INDEX tidings_events_correlation
                ON tidings_events (json_extract(metadata, '$.correlation_id'), position)
                WHERE metadata IS NOT NULL""",
        ],
    ),
]

_COLUMNS = "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata"
_INSERT = (
    "INSERT INTO tidings_events (position, id, stream_id, version, type, schema_version, "
    "recorded_at, data, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_STREAM = (
    "INSERT INTO tidings_streams (stream_id, version) VALUES (?, ?) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version"
)
_SYNCHRONOUS = ("off", "normal", "full", "extra")
_FLOAT_EXACT_BELOW = 2**32 * 1_000_000  # microseconds; the year 2106


def _from_micros(micros: int, _from_timestamp: Any = datetime.fromtimestamp) -> datetime:
    """Stored microseconds to an aware UTC datetime, exactly.

    Below 2**32 seconds a double holds micros / 1e6 to within 0.48 microseconds, so the
    one-call float path rounds back to the stored microsecond; later times take the exact path.
    """
    if 0 <= micros < _FLOAT_EXACT_BELOW:
        return _from_timestamp(micros / 1e6, UTC)  # type: ignore[no-any-return]
    return _EPOCH + timedelta(microseconds=micros)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_GROUP = 512  # appends committed together at most
_INLINE_ROWS = 128  # stream reads up to this many rows run on the caller's thread

# One signal per database file, so stores on the same file in one process wake each other.
_signals: weakref.WeakValueDictionary[str, AppendSignal] = weakref.WeakValueDictionary()
_signals_lock = threading.Lock()


def _schema_version(conn: sqlite3.Connection) -> int | None:
    """The applied schema version, or None when the file holds no tidings tables."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tidings_schema'"
    ).fetchone()
    if not exists:
        return None
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM tidings_schema").fetchone()[0])


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the missing migrations; safe when several processes start at once."""
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS tidings_schema (version INTEGER NOT NULL)")
        current = _schema_version(conn) or 0
        for version, statements in MIGRATIONS:
            if version > current:
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO tidings_schema (version) VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@contextmanager
def _mapped_errors(path: str) -> Iterator[None]:
    """Translate sqlite3 errors into tidings errors, in one place."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"sqlite ({path}): {exc}") from exc


class _TransactionLost(Exception):
    """SQLite rolled a group's whole transaction back by itself (it does on a full disk or an
    I/O error): every request of the group failed with `error`, and nothing more may run, since
    a statement now would run outside the group's transaction, in a transaction of its own."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Job:
    """Other writes (snapshots, projection commits) run by the writer in its transaction."""

    work: Callable[[sqlite3.Connection, int], Any]  # (connection, now in microseconds)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)


@dataclass(slots=True)
class _Append:
    stream_id: str
    expected: ExpectedVersion
    events: list[EncodedEvent]
    metadata: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[AppendResult] = field(repr=False)


class SQLiteEventStore(StoreBase):
    """An event store in one SQLite file: `sqlite:///relative.db` or `sqlite:////abs/path.db`.

    Args:
        synchronous: SQLite's `synchronous` pragma; `full` (default) makes every commit
            durable against power loss, `normal` only against a crash of the process.
        create: create the file and tables when missing (default); False raises
            `StoreNotFound` instead, for tools that only read.
        busy_timeout: milliseconds to wait for another process's write lock.
        readers: reader threads (and connections).
    """

    shared_across_processes = True
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
        with _signals_lock:
            key = os.path.realpath(self.path)
            signal = _signals.get(key)
            if signal is None:
                signal = _signals[key] = AppendSignal()
        self._signal = signal
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

    def _prepare(self) -> sqlite3.Connection:
        """Open the writer connection, switch to WAL and migrate the schema (in a thread).

        With `create=False` nothing is changed in a file that holds no tidings tables, and a
        current schema is only read, never locked.
        """
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

    # -- writing ---------------------------------------------------------------------------

    async def _append(
        self,
        stream_id: str,
        expected: ExpectedVersion,
        events: list[EncodedEvent],
        metadata: str | None,
    ) -> AppendResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendResult] = loop.create_future()
        self._requests.put(_Append(stream_id, expected, events, metadata, loop, future))
        return await future

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        """The writer thread: take every waiting append, commit them as one transaction."""
        try:
            while True:
                first = self._requests.get()
                if first is None:
                    break
                group: list[_Append | _Job] = [first]
                stop = False
                while len(group) < _MAX_GROUP:
                    try:
                        item = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    group.append(item)
                _settle(group, self._commit_group(conn, group))
                if stop:
                    break
        finally:
            conn.close()
            while True:  # anything queued behind the close is refused, not left hanging
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _settle([item], [StoreClosed("the store was closed before this append ran")])

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Append | _Job]) -> list[Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = StoreError(f"sqlite ({self.path}): cannot start a write: {exc}")
            error.__cause__ = exc
            return [error] * len(group)
        outcomes: list[Any] = []
        try:
            next_position = conn.execute(
                "SELECT coalesce(max(position), 0) + 1 FROM tidings_events"
            ).fetchone()[0]
            versions: dict[str, int] = {}
            now = time.time_ns() // 1000
            for request in group:
                if isinstance(request, _Job):
                    outcomes.append(self._run_job(conn, request, now, len(group) == 1))
                    continue
                try:
                    result = self._apply(
                        conn, request, versions, next_position, now, len(group) == 1
                    )
                except (TidingsError, sqlite3.Error) as exc:
                    outcomes.append(_as_tidings_error(exc, self.path))
                    continue
                outcomes.append(result)
                if result.position >= next_position:
                    next_position = result.position + 1
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, _TransactionLost):
                exc = exc.error
            failure: BaseException = (
                _as_tidings_error(exc, self.path) if isinstance(exc, Exception) else exc
            )
            return [failure] * len(group)
        return outcomes

    def _apply(
        self,
        conn: sqlite3.Connection,
        request: _Append,
        versions: dict[str, int],
        next_position: int,
        now: int,
        alone: bool,
    ) -> AppendResult:
        """Check and insert one append inside the open transaction, under a savepoint."""
        stream_id = request.stream_id
        actual = versions.get(stream_id)
        if actual is None:
            row = conn.execute(
                "SELECT version FROM tidings_streams WHERE stream_id = ?", (stream_id,)
            ).fetchone()
            actual = row[0] if row else 0
        if not expected_matches(request.expected, actual):
            found = self._find_ids(conn, request.events)
            if found:
                return resolve_duplicates(stream_id, [e.id for e in request.events], found)
            raise WrongExpectedVersion(stream_id, request.expected, actual)
        rows = [
            (
                next_position + i,
                e.id.bytes,
                stream_id,
                actual + 1 + i,
                e.type,
                e.schema_version,
                now,
                e.data,
                request.metadata,
            )
            for i, e in enumerate(request.events)
        ]
        # A savepoint lets one append fail without undoing the others in its group; an
        # append alone in its transaction can simply roll the transaction back.
        if not alone:
            conn.execute("SAVEPOINT append")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute(_UPSERT_STREAM, (stream_id, actual + len(rows)))
        except sqlite3.Error as exc:
            if not conn.in_transaction:
                raise _TransactionLost(exc) from exc
            if alone:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("ROLLBACK TO append")
                conn.execute("RELEASE append")
            if isinstance(exc, sqlite3.IntegrityError):  # an event id stored before
                found = self._find_ids(conn, request.events)
                if found:
                    return resolve_duplicates(stream_id, [e.id for e in request.events], found)
            raise
        if not alone:
            conn.execute("RELEASE append")
        versions[stream_id] = actual + len(rows)
        return AppendResult(version=actual + len(rows), position=next_position + len(rows) - 1)

    def _run_job(self, conn: sqlite3.Connection, job: _Job, now: int, alone: bool) -> Any:
        """Run one job under its own savepoint; its failure is its outcome, not the group's."""
        if not alone:
            conn.execute("SAVEPOINT job")
        try:
            result = job.work(conn, now)
        except (TidingsError, sqlite3.Error) as exc:
            if not conn.in_transaction:
                raise _TransactionLost(exc) from exc
            if alone:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            return _as_tidings_error(exc, self.path)
        if not alone:
            conn.execute("RELEASE job")
        return result

    async def _write(self, work: Callable[[sqlite3.Connection, int], T]) -> T:
        """Run `work` on the writer connection inside a write transaction."""
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._requests.put(_Job(work, loop, future))
        return await future

    @staticmethod
    def _find_ids(
        conn: sqlite3.Connection, events: list[EncodedEvent]
    ) -> dict[Any, tuple[str, int, int]]:
        found: dict[Any, tuple[str, int, int]] = {}
        ids = [e.id.bytes for e in events]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for raw, stream_id, version, position in conn.execute(
                "SELECT id, stream_id, version, position FROM tidings_events "
                f"WHERE id IN ({marks})",
                chunk,
            ):
                found[UUID(bytes=raw)] = (stream_id, version, position)
        return found

    # -- reading ---------------------------------------------------------------------------

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

    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        order, compare = ("DESC", "<=") if backwards else ("ASC", ">=")
        sql = (
            f"SELECT {_COLUMNS} FROM tidings_events WHERE stream_id = ? AND version {compare} ? "
            f"ORDER BY version {order} LIMIT ?"
        )

        def work(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(sql, (stream_id, from_version, limit)).fetchall()

        if limit <= _INLINE_ROWS:
            return self._inline(work)
        return await self._run(work)

    async def _read_all_batch(
        self, after: int, limit: int, types: frozenset[str] | None
    ) -> tuple[list[Row], int]:
        def work(conn: sqlite3.Connection) -> tuple[list[Row], int]:
            if types is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM tidings_events WHERE position > ? "
                    "ORDER BY position LIMIT ?",
                    (after, limit),
                ).fetchall()
                return rows, rows[-1][0] if rows else after
            # Filtered: the rows and the end of the log must come from one snapshot, or an
            # event committed in between could be passed over.
            marks = ", ".join("?" * len(types))
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM tidings_events WHERE position > ? "
                    f"AND type IN ({marks}) ORDER BY position LIMIT ?",
                    (after, *sorted(types), limit),
                ).fetchall()
                if len(rows) == limit:
                    scanned = rows[-1][0]
                else:
                    scanned = conn.execute(
                        "SELECT coalesce(max(position), 0) FROM tidings_events"
                    ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return rows, max(scanned, after)

        return await self._run(work)

    async def _stream_version(self, stream_id: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT version FROM tidings_streams WHERE stream_id = ?", (stream_id,)
            ).fetchone()
            return row[0] if row else 0

        return self._inline(work)  # one primary-key lookup

    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        def work(conn: sqlite3.Connection) -> list[StreamInfo]:
            rows = conn.execute(
                "SELECT stream_id, version FROM tidings_streams WHERE stream_id > ? "
                "ORDER BY stream_id LIMIT ?",
                (after, limit),
            ).fetchall()
            for stream_id, _ in rows:
                if stream_id.__class__ is not str:  # a row written around tidings
                    raise StoreError(f"sqlite ({self.path}): stream id {stream_id!r:.80} not text")
            return [StreamInfo(stream_id, version) for stream_id, version in rows]

        return await self._run(work)

    async def _last_position(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT coalesce(max(position), 0) FROM tidings_events").fetchone()
            return int(row[0])

        return await self._run(work)

    # -- snapshots -------------------------------------------------------------------------

    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO tidings_snapshots (stream_id, version, type, "
                "schema_version, recorded_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                (stream_id, version, type, schema_version, now, data),
            )

        await self._write(work)

    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        top = _END if max_version is None else max_version
        until = _END if recorded_until is None else _to_micros(recorded_until)

        def work(conn: sqlite3.Connection) -> Snapshot | None:
            row = conn.execute(
                "SELECT stream_id, version, type, schema_version, recorded_at, data "
                "FROM tidings_snapshots WHERE stream_id = ? AND version <= ? "
                "AND recorded_at <= ? ORDER BY version DESC LIMIT 1",
                (stream_id, top, until),
            ).fetchone()
            if row is None:
                return None
            return Snapshot(row[0], row[1], row[2], row[3], _from_micros(row[4]), row[5])

        return self._inline(work)  # one primary-key lookup

    # -- projections -----------------------------------------------------------------------

    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        def work(conn: sqlite3.Connection) -> list[ProjectionState]:
            if name is None:
                rows = conn.execute(f"SELECT {_PROJECTION} ORDER BY name").fetchall()
            else:
                rows = conn.execute(f"SELECT {_PROJECTION} WHERE name = ?", (name,)).fetchall()
            return [_projection_state(row) for row in rows]

        return await self._run(work)

    async def _commit_projection(
        self,
        name: str,
        generation: int,
        expected_position: int,
        position: int,
        writes: Mapping[str, str | None],
    ) -> None:
        upserts = [(name, generation, k, doc) for k, doc in writes.items() if doc is not None]
        deletes = [(name, generation, k) for k, doc in writes.items() if doc is None]

        def work(conn: sqlite3.Connection, now: int) -> None:
            current = _read_projection(conn, name)
            state = advance_projection(
                current, name, generation, expected_position, position, _from_micros(now)
            )
            if upserts:
                conn.executemany(_UPSERT_DOCUMENT, upserts)
            if deletes:
                conn.executemany(
                    "DELETE FROM tidings_documents WHERE projection = ? AND generation = ? "
                    "AND key = ?",
                    deletes,
                )
            _save_projection(conn, state, now)

        await self._write(work)

    async def _start_rebuild(self, name: str) -> ProjectionState:
        def work(conn: sqlite3.Connection, now: int) -> ProjectionState:
            state = begin_rebuild(_read_projection(conn, name), name, _from_micros(now))
            conn.execute(  # what an aborted rebuild left behind
                "DELETE FROM tidings_documents WHERE projection = ? AND generation <> ?",
                (name, state.generation),
            )
            _save_projection(conn, state, now)
            return state

        return await self._write(work)

    async def _finish_rebuild(self, name: str, generation: int) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            current = _read_projection(conn, name)
            state = swap_rebuild(current, name, generation, _from_micros(now))
            conn.execute(
                "DELETE FROM tidings_documents WHERE projection = ? AND generation <> ?",
                (name, generation),
            )
            _save_projection(conn, state, now)

        await self._write(work)

    async def _get_documents(
        self, name: str, generation: int | None, keys: Sequence[str]
    ) -> dict[str, str]:
        def work(conn: sqlite3.Connection) -> dict[str, str]:
            gen = _generation_of(conn, name) if generation is None else generation
            found: dict[str, str] = {}
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        "SELECT key, doc FROM tidings_documents WHERE projection = ? "
                        f"AND generation = ? AND key IN ({marks})",
                        (name, gen, *chunk),
                    ).fetchall()
                )
            return found

        return await self._run(work)

    async def _documents_batch(
        self, name: str, generation: int | None, after: str, limit: int
    ) -> list[tuple[str, str]]:
        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            gen = _generation_of(conn, name) if generation is None else generation
            rows = conn.execute(
                "SELECT key, doc FROM tidings_documents WHERE projection = ? AND generation = ? "
                "AND key > ? ORDER BY key LIMIT ?",
                (name, gen, after, limit),
            ).fetchall()
            return [(key, doc) for key, doc in rows]

        return await self._run(work)

    def _document_reader(self, name: str, generation: int) -> Callable[[str], str | None]:
        sql = (
            "SELECT doc FROM tidings_documents WHERE projection = ? AND generation = ? AND key = ?"
        )

        # This thread's read-only connection, taken once: the reader is called per event.
        execute = self._inline(lambda conn: conn.execute)
        path = self.path

        def read(key: str) -> str | None:
            try:
                row = execute(sql, (name, generation, key)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"sqlite ({path}): {exc}") from exc
            return None if row is None else str(row[0])

        return read

    # -- leases ----------------------------------------------------------------------------

    # -- tracing ---------------------------------------------------------------------------

    async def _correlation_rows(self, correlation_id: str, limit: int) -> list[Row]:
        def work(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                f"SELECT {_COLUMNS} FROM tidings_events WHERE metadata IS NOT NULL "
                "AND json_extract(metadata, '$.correlation_id') = ? ORDER BY position LIMIT ?",
                (correlation_id, limit),
            ).fetchall()

        return await self._run(work)

    # -- personal data ---------------------------------------------------------------------

    async def _subject_keys(self, subjects: set[str], create: bool) -> dict[str, bytes]:
        wanted = sorted(subjects)

        def select(conn: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        f"SELECT subject, key FROM tidings_subject_keys WHERE subject IN ({marks})",
                        chunk,
                    ).fetchall()
                )
            return found

        if not create:
            return self._inline(select)

        def make(conn: sqlite3.Connection, now: int) -> dict[str, bytes]:
            conn.executemany(
                "INSERT OR IGNORE INTO tidings_subject_keys (subject, key) VALUES (?, ?)",
                [(subject, new_key()) for subject in wanted],
            )
            return select(conn)

        return await self._write(make)

    async def _forget(self, subject: str) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute("DELETE FROM tidings_subject_keys WHERE subject = ?", (subject,))
            conn.execute("DELETE FROM tidings_snapshots")

        await self._write(work)
        # The WAL still holds the pages as they were: fold it into the file and empty it.
        await asyncio.get_running_loop().run_in_executor(None, self._truncate_wal)

    def _truncate_wal(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout)}")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    async def _acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        def work(conn: sqlite3.Connection, now: int) -> bool:
            row = conn.execute(
                "INSERT INTO tidings_leases (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE tidings_leases.owner = excluded.owner OR tidings_leases.expires_at < ? "
                "RETURNING owner",
                (name, owner, now + int(ttl * 1_000_000), now),
            ).fetchone()
            return row is not None and row[0] == owner

        return await self._write(work)

    async def _release_lease(self, name: str, owner: str) -> None:
        def work(conn: sqlite3.Connection, now: int) -> None:
            conn.execute("DELETE FROM tidings_leases WHERE name = ? AND owner = ?", (name, owner))

        await self._write(work)


_PROJECTION = (
    "name, generation, position, updated_at, building_generation, building_position "
    "FROM tidings_projections"
)
_UPSERT_DOCUMENT = (
    "INSERT INTO tidings_documents (projection, generation, key, doc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (projection, generation, key) DO UPDATE SET doc = excluded.doc"
)
_END = 2**62


def _projection_state(row: Any) -> ProjectionState:
    return ProjectionState(row[0], row[1], row[2], _from_micros(row[3]), row[4], row[5])


def _read_projection(conn: sqlite3.Connection, name: str) -> ProjectionState | None:
    row = conn.execute(f"SELECT {_PROJECTION} WHERE name = ?", (name,)).fetchone()
    return None if row is None else _projection_state(row)


def _save_projection(conn: sqlite3.Connection, state: ProjectionState, now: int) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO tidings_projections (name, generation, position, updated_at, "
        "building_generation, building_position) VALUES (?, ?, ?, ?, ?, ?)",
        (
            state.name,
            state.generation,
            state.position,
            now,
            state.building_generation,
            state.building_position,
        ),
    )


def _generation_of(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT generation FROM tidings_projections WHERE name = ?", (name,))
    found = row.fetchone()
    return 0 if found is None else int(found[0])


def _to_micros(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _settle(group: list[_Append | _Job], outcomes: list[Any]) -> None:
    """Hand each append its outcome on its own event loop: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
    for request, outcome in zip(group, outcomes, strict=True):
        by_loop.setdefault(request.loop, []).append((request.future, outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, items)
        except RuntimeError:  # the loop is gone; nobody waits for these
            pass


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in items:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _as_tidings_error(exc: Exception, path: str) -> Exception:
    if isinstance(exc, TidingsError):
        return exc
    error = StoreError(f"sqlite ({path}): {exc}")
    error.__cause__ = exc
    return error


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


def _quote_path(path: str) -> str:
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
