"""Reading the PostgreSQL store: streams, the global log, the stream list, correlations.

Positions commit out of order, so `_read_all_batch` reads in position order up to the first
hole and treats a hole as permanent (a rolled-back or unused sequence value) only once every
transaction that could have drawn it has ended: a writer takes its transaction id before it
draws positions, and a hole is closed when the oldest running transaction id is above a
"guard" id taken after the hole was seen (see ARCHITECTURE.md for why both steps matter).
"""

from __future__ import annotations

from typing import Any

from tidings.store.base import Row, StreamInfo
from tidings.store.postgres.connection import PostgresCore

__all__ = ["PostgresReading"]

_COLUMNS = "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata"


class PostgresReading(PostgresCore):
    """One batch of a stream or of the log (gap-free), stream versions and the stream list."""

    async def _read_stream_batch(
        self, stream_id: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        order, compare = ("DESC", "<=") if backwards else ("ASC", ">=")
        rows: list[Row] = await self._fetch(
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
        rows = await self._fetch(
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
        version = await self._fetchval(
            f"SELECT version FROM {self._s}.tidings_streams WHERE stream_id = $1", stream_id
        )
        return int(version or 0)

    async def _streams_batch(self, after: str, limit: int) -> list[StreamInfo]:
        query = (
            f"SELECT stream_id, version FROM {self._s}.tidings_streams "
            "WHERE stream_id > $1 AND version > 0 ORDER BY stream_id LIMIT $2"
        )
        rows = await self._fetch(query, after, limit)
        return [StreamInfo(stream_id, version) for stream_id, version in rows]

    async def _last_position(self) -> int:
        found = await self._fetchval(
            f"SELECT coalesce(max(position), 0) FROM {self._s}.tidings_events"
        )
        return int(found)
