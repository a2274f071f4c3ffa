"""Reading the PostgreSQL store: streams, the global log, the stream list, correlations.

Positions commit out of order, so `_read_all_batch` reads in position order up to the first
hole and treats a hole as permanent (a rolled-back or unused sequence value) only once every
transaction that could have drawn it has ended: a writer takes its transaction id before it
draws positions, and a hole is closed when the oldest running transaction id is above a
"guard" id taken after the hole was seen (see ARCHITECTURE.md for why both steps matter).
"""

from __future__ import annotations

from typing import Any

from tidings.core.query import Selection
from tidings.store.base import Row, StreamInfo
from tidings.store.postgres.connection import PostgresCore
from tidings.store.selecting import Placeholders, selected_positions

__all__ = ["PostgresReading"]

_COLUMNS = (
    "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata, tags"
)
_COUNTED = 10_000  # positions past the settled one that are counted to find no hole at once
_WALKED = 10_000  # positions read per round trip when a hole must be found


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
        self, after: int, limit: int, selection: Selection | None
    ) -> tuple[list[Row], int]:
        if selection is not None:
            return await self._read_selected(after, limit, selection)
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
        return accepted, scanned

    async def _read_selected(
        self, after: int, limit: int, selection: Selection
    ) -> tuple[list[Row], int]:
        """A batch through the tag and type indexes, up to the settled position: below it
        no hole can still fill, so reading by index skips nothing committed later.

        One round trip when nothing is in flight: the statement reads the rows up to the
        newest position together with a count of the positions since the last settled one;
        a count that shows no hole makes the newest position settled. Otherwise the settled
        position is found (`_settled`) and the batch is read again up to it."""
        known = self._settled_to
        sql, values = self._selected_sql(selection, after, limit, known)
        async with self._connection() as conn:
            found = await conn.fetch(sql, *values)
            newest, counted = found[0][0], found[0][1]
            rows: list[Row] = [row[2:] for row in found if row[2] is not None]
            settled = max(known, newest)
            if newest > known:
                if self._no_hole(known, newest, counted):
                    self._settled_to = max(self._settled_to, newest)
                else:  # a hole: read again, up to what is settled now (a fresh snapshot)
                    settled = await self._settled(conn)
                    sql, values = self._selected_sql(selection, after, limit, None, settled)
                    rows = list(await conn.fetch(sql, *values))
        if len(rows) == limit:
            return rows, rows[-1][0]
        return rows, max(settled, after)

    def _selected_sql(
        self,
        selection: Selection,
        after: int,
        limit: int,
        known: int | None,
        until: int | None = None,
    ) -> tuple[str, list[Any]]:
        """The statement of a selected batch and its values: with `known`, the rows up to
        the newest position plus that position and the count of positions in (known,
        known + _COUNTED], in one snapshot; else the rows up to `until`."""
        mark = Placeholders(numbered=True)
        first, size = mark(after), mark(limit)
        events = f"{self._s}.tidings_events"
        bound = "h.newest" if known is not None else mark(until)
        positions = selected_positions(
            selection,
            mark,
            after=first,
            limit=size,
            until=bound,
            events=events,
            tags=f"{self._s}.tidings_tags",
        )
        rows = (
            f"SELECT {_COLUMNS} FROM {events} WHERE position IN ({positions}) "
            f"ORDER BY position LIMIT {size}"
        )
        if known is None:
            return rows, mark.values
        since = mark(known)
        return (
            "SELECT h.newest, h.counted, e.* FROM (SELECT coalesce(max(position), 0) AS newest, "
            f"(SELECT count(*) FROM {events} WHERE position > {since} "
            f"AND position <= {since} + {_COUNTED}) AS counted FROM {events}) AS h "
            f"LEFT JOIN LATERAL ({rows}) AS e ON true"
        ), mark.values

    def _no_hole(self, settled: int, newest: int, counted: int) -> bool:
        """Whether `counted` positions in (settled, newest] leave no hole there."""
        if newest - settled > _COUNTED:
            return False
        skipped = sum(1 for p in self._skipped if settled < p <= newest) if self._skipped else 0
        return bool(counted + skipped == newest - settled)

    async def _settled(self, conn: Any) -> int:
        """The newest position at or below which every position is settled: committed, or
        a hole no transaction can fill any more. Cheap when nothing is in flight: one count
        of the positions since the last settled one, or else one look at the sequence and
        the oldest running transaction; only then a walk of the positions to the first
        hole (the rules of `_up_to_first_hole`)."""
        settled = self._settled_to
        newest, count = await conn.fetchrow(
            f"SELECT (SELECT coalesce(max(position), 0) FROM {self._s}.tidings_events), "
            f"(SELECT count(*) FROM {self._s}.tidings_events "
            "WHERE position > $1 AND position <= $1 + $2)",
            settled,
            _COUNTED,
        )
        if newest <= settled:
            return int(newest)
        if self._no_hole(settled, newest, count):
            self._settled_to = newest
            return int(newest)
        # Every position drawn so far is at most the sequence's last value; once every
        # transaction older than an id taken after reading it has ended, all are settled.
        drawn = await conn.fetchval(
            f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
            f"FROM {self._s}.tidings_positions"
        )
        guard = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        oldest = int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
        if oldest > guard and drawn >= newest:
            self._settled_to = newest
            return int(newest)
        after = settled
        for _ in range(1000):  # bounded; a hole that fills is read again
            rows = await conn.fetch(
                f"SELECT position FROM {self._s}.tidings_events WHERE position > $1 "
                "AND position <= $2 ORDER BY position LIMIT $3",
                after,
                newest,
                _WALKED,
            )
            accepted, scanned, retry = await self._up_to_first_hole(conn, rows, after)
            if retry:
                continue
            if len(rows) == _WALKED and accepted and scanned == rows[-1][0]:
                after = scanned
                continue
            after = scanned
            break
        self._settled_to = max(self._settled_to, after)
        return after

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
        async with self._connection() as conn:
            return await self._settled(conn)
