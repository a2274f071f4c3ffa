"""Reading: stream and log reads, on reader threads or inline on the caller's thread.

Scans run on a small pool of reader threads, each with its own connection; lookups by key and
short stream reads run inline on the loop's own read-only connection (microseconds, less than
a thread hand-off); rows are decoded on the loop.
"""

from __future__ import annotations

import sqlite3

from tidings.core.errors import StoreError
from tidings.core.query import Selection
from tidings.store.base import Row, StreamInfo
from tidings.store.selecting import Placeholders, selected_positions
from tidings.store.sqlite.connection import SQLiteCore
from tidings.store.sqlite.schema import _COLUMNS

_INLINE_ROWS = 128  # stream reads up to this many rows run on the caller's thread


class SQLiteReading(SQLiteCore):
    """Stream and log reads, the stream list, the last position, and tracing lookups."""

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
        self, after: int, limit: int, selection: Selection | None
    ) -> tuple[list[Row], int]:
        if selection is not None:
            mark = Placeholders(numbered=False)
            first, size = mark(after), mark(limit)
            positions = selected_positions(selection, mark, after=first, limit=size)
            sql = (
                f"SELECT {_COLUMNS} FROM tidings_events WHERE position IN ({positions}) "
                f"ORDER BY position LIMIT {size}"
            )
            params = mark.named

        def work(conn: sqlite3.Connection) -> tuple[list[Row], int]:
            if selection is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM tidings_events WHERE position > ? "
                    "ORDER BY position LIMIT ?",
                    (after, limit),
                ).fetchall()
                return rows, rows[-1][0] if rows else after
            # Filtered: the rows and the end of the log must come from one snapshot, or an
            # event committed in between could be passed over.
            conn.execute("BEGIN")
            try:
                rows = conn.execute(sql, params).fetchall()
                if len(rows) == limit:
                    scanned = rows[-1][0]
                else:
                    scanned = conn.execute(
                        "SELECT coalesce(max(position), 0) FROM tidings_events"
                    ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return rows, max(scanned, after)

        if selection is not None and limit <= _INLINE_ROWS:
            return self._inline(work)  # a few index ranges of a decision's read
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

        return self._inline(work)  # the last row of the primary key: microseconds

    # -- tracing ---------------------------------------------------------------------------

    async def _correlation_rows(self, correlation_id: str, limit: int) -> list[Row]:
        def work(conn: sqlite3.Connection) -> list[Row]:
            return conn.execute(
                f"SELECT {_COLUMNS} FROM tidings_events WHERE metadata IS NOT NULL "
                "AND json_extract(metadata, '$.correlation_id') = ? ORDER BY position LIMIT ?",
                (correlation_id, limit),
            ).fetchall()

        return await self._run(work)
