"""Writing: the writer thread, group commit, and `_write` for every other write.

One writer thread owns the write connection and commits appends in groups: every append
waiting when a commit starts joins it, each checked against its own expected version inside a
savepoint, so one failing append never takes others with it, and a hundred appends share one
fsync. Other writes (snapshots, projection commits, leases, keys) are `_Job`s the writer runs
in the same transactions.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from tidings.core.codec import TAG_SEPARATOR, EncodedEvent
from tidings.core.errors import StoreClosed, StoreError, TidingsError, WrongExpectedVersion
from tidings.store.appending import Condition, EncodedAppend
from tidings.store.base import AppendResult, expected_matches, resolve_duplicates
from tidings.store.selecting import Placeholders, selected_positions
from tidings.store.sqlite.connection import SQLiteCore, _as_tidings_error
from tidings.store.sqlite.schema import _INSERT, _INSERT_TAG, _UPSERT_STREAM

T = TypeVar("T")

_MAX_GROUP = 512  # appends committed together at most


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
    """An append waiting for the writer thread."""

    batch: EncodedAppend
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[AppendResult] = field(repr=False)


class SQLiteAppending(SQLiteCore):
    """`_append` through the writer thread's group commit, and `_write` for other writes."""

    # Set by `SQLiteEventStore.__init__`.
    commits: int
    _requests: queue.SimpleQueue[_Append | _Job | None]

    async def _append(self, batch: EncodedAppend) -> AppendResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendResult] = loop.create_future()
        self._requests.put(_Append(batch, loop, future))
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
        batch = request.batch
        stream_id = batch.stream_id
        actual = versions.get(stream_id)
        if actual is None:
            row = conn.execute(
                "SELECT version FROM tidings_streams WHERE stream_id = ?", (stream_id,)
            ).fetchone()
            actual = row[0] if row else 0
        if not expected_matches(batch.expected, actual):
            found = self._find_ids(conn, batch.events)
            if found:
                return resolve_duplicates(stream_id, [e.id for e in batch.events], found)
            raise WrongExpectedVersion(stream_id, batch.expected, actual)
        if batch.condition is not None:
            # One writer: nothing can commit between this check and the insert below.
            conflict = _first_match(conn, batch.condition)
            if conflict is not None:
                found = self._find_ids(conn, batch.events)
                if found:
                    return resolve_duplicates(stream_id, [e.id for e in batch.events], found)
                raise batch.condition.failed(stream_id, *conflict)
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
                batch.metadata,
                TAG_SEPARATOR.join(e.tags) if e.tags else None,
            )
            for i, e in enumerate(batch.events)
        ]
        tags = [(tag, next_position + i) for i, e in enumerate(batch.events) for tag in e.tags]
        # A savepoint lets one append fail without undoing the others in its group; an
        # append alone in its transaction can simply roll the transaction back.
        if not alone:
            conn.execute("SAVEPOINT append")
        try:
            conn.executemany(_INSERT, rows)
            if tags:
                conn.executemany(_INSERT_TAG, tags)
            conn.execute(_UPSERT_STREAM, (stream_id, actual + len(rows)))
        except sqlite3.Error as exc:
            _undo(conn, exc, "append", alone)
            if isinstance(exc, sqlite3.IntegrityError):  # an event id stored before
                found = self._find_ids(conn, batch.events)
                if found:
                    return resolve_duplicates(stream_id, [e.id for e in batch.events], found)
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
            _undo(conn, exc, "job", alone)
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


def _first_match(conn: sqlite3.Connection, condition: Condition) -> tuple[int, str] | None:
    """The position and type of the first event after the condition's position that its
    query selects, or None: an append condition's check, through the indexes."""
    if condition.selection is None:
        sql = "SELECT position, type FROM tidings_events WHERE position > ? ORDER BY position"
        row = conn.execute(sql + " LIMIT 1", (condition.after,)).fetchone()
    else:
        mark = Placeholders(numbered=False)
        after, one = mark(condition.after), mark(1)
        positions = selected_positions(condition.selection, mark, after=after, limit=one)
        row = conn.execute(
            f"SELECT position, type FROM tidings_events WHERE position IN ({positions}) "
            "ORDER BY position LIMIT 1",
            mark.named,
        ).fetchone()
    return (row[0], row[1]) if row else None


def _undo(conn: sqlite3.Connection, exc: Exception, savepoint: str, alone: bool) -> None:
    """Undo a failed append or job: its savepoint, or the transaction it had alone.

    A transaction SQLite already rolled back by itself raises `_TransactionLost`."""
    if not conn.in_transaction:
        raise _TransactionLost(exc) from exc
    if alone:
        conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn.execute(f"ROLLBACK TO {savepoint}")
        conn.execute(f"RELEASE {savepoint}")


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
