"""Reading the PostgreSQL store: streams, the global log, the stream list, correlations.

Positions commit out of order, so `_read_all_batch` reads in position order up to the first
hole and treats a hole as permanent (a rolled-back or unused sequence value) only once every
transaction that could have drawn it has ended: a writer takes its transaction id before it
draws positions, and a hole is closed when the oldest running transaction id is above a
"guard" id taken after the hole was seen (see ARCHITECTURE.md for why both steps matter).
"""

from __future__ import annotations

import time
from typing import Any

from tidings.core.query import Selection
from tidings.store.base import Row, StreamInfo
from tidings.store.postgres.connection import PostgresCore
from tidings.store.selecting import Placeholders, selected_positions

__all__ = ["PostgresReading"]

_COLUMNS = (
    "position, id, stream_id, version, type, schema_version, recorded_at, data, metadata, tags"
)
_SETTLING = 10_000  # positions past the settled one a reach statement looks at
_PATIENCE = 0.2  # seconds a hole may stay before `_settled` asks whether it can still fill
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

        One round trip, in flight or not: the statement finds, in its own snapshot, the
        newest position and the last one before the first hole since the last settled
        position (`_SETTLING`), and reads the selected rows up to that one. A young hole is
        a writer still committing: the batch stops below it. Only a hole that stays, one
        known never to fill, or a reader far behind takes `_settled`'s further steps."""
        known = self._settled_to
        sql, values = self._selected_sql(selection, after, limit, known)
        async with self._connection() as conn:
            found = await conn.fetch(sql, *values)
            newest, reached = found[0][0], found[0][1]
            rows: list[Row] = [row[2:] for row in found if row[2] is not None]
            settled = self._reached(known, newest, reached)
            if settled is None:  # read again, up to what is settled now (a fresh snapshot)
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
        """The statement of a selected batch and its values: with `known`, the newest
        position, the last one before the first hole after `known`, and the rows up to that
        one, in one snapshot; else the rows up to `until`."""
        mark = Placeholders(numbered=True)
        first, size = mark(after), mark(limit)
        events = f"{self._s}.tidings_events"
        bound = "h.reached" if known is not None else mark(until)
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
        return (  # (materialized: else the planner repeats the reach for every row)
            f"WITH h AS MATERIALIZED ({self._reach_sql(mark(known))}) "
            f"SELECT h.newest, h.reached, e.* FROM h LEFT JOIN LATERAL ({rows}) AS e ON true"
        ), mark.values

    def _reach_sql(self, since: str) -> str:
        """`SELECT newest, reached`: the newest position, and the last position up to which
        every one after `since` is present (at most `_SETTLING` past it), in one snapshot.
        In the unbroken run after `since`, a position less its rank is `since`; past the
        first hole it is more, so the run's length is a count."""
        events = f"{self._s}.tidings_events"
        return (
            f"SELECT n.newest, {since} + (SELECT count(*) FROM (SELECT position - "
            f"row_number() OVER (ORDER BY position) AS d FROM {events} WHERE position > {since} "
            f"AND position <= least(n.newest, {since} + {_SETTLING})) AS w "
            f"WHERE w.d = {since}) AS reached "
            f"FROM (SELECT coalesce(max(position), 0) AS newest FROM {events}) AS n"
        )

    def _reached(self, known: int, newest: int, reached: int) -> int | None:
        """The settled position a reach statement shows, or None when `_settled` must
        decide: the hole at `reached + 1` is one known never to fill, has stayed longer
        than `_PATIENCE`, or the run stopped at `_SETTLING` positions without a hole."""
        if self._young:
            for position in [p for p in self._young if p <= reached]:
                del self._young[position]
        if reached >= newest:
            self._settled_to = max(self._settled_to, newest)
            return max(known, newest)
        hole, now = reached + 1, time.monotonic()
        seen = self._young.setdefault(hole, now)
        if hole in self._skipped or reached - known >= _SETTLING or now - seen > _PATIENCE:
            self._young[hole] = now  # `_settled` looks at it now; it waits again after
            return None
        self._settled_to = max(self._settled_to, reached)
        return max(known, reached)

    async def _settled(self, conn: Any) -> int:
        """The newest position at or below which every position is settled: committed, or
        a hole no transaction can fill any more. One statement when nothing is in flight or
        a writer is still committing (`_reached`); else one look at the sequence and the
        oldest running transaction; only then a walk of the positions to the first hole
        (the rules of `_up_to_first_hole`)."""
        settled = self._settled_to
        newest, reached = await conn.fetchrow(
            f"SELECT newest, reached FROM ({self._reach_sql('$1')}) AS h", settled
        )
        quick = self._reached(settled, newest, reached)
        if quick is not None:
            return quick
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
