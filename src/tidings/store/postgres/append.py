"""Appending to the PostgreSQL store: one round trip to the `tidings_append` function, which
locks the stream's row, checks the expected version and draws positions; a lost connection is
retried once with the same ids, and a retry of stored events is told from a clash.
"""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tidings.core.errors import StoreError, WrongExpectedVersion
from tidings.store.appending import EncodedAppend
from tidings.store.base import (
    ANY,
    STREAM_EXISTS,
    AppendResult,
    resolve_duplicates,
)
from tidings.store.postgres.connection import _CONNECTION_ERRORS, log
from tidings.store.postgres.subscriptions import PostgresSubscriptions

__all__ = ["PostgresAppending"]

_EXPECTED_CODES = {ANY: -1, STREAM_EXISTS: -2}
_APPEND_ATTEMPTS = 2  # a lost connection is retried once with the same ids (idempotent)


class PostgresAppending(PostgresSubscriptions):
    """`_append` (which announces each commit to other processes' subscribers)."""

    async def _append(self, batch: EncodedAppend) -> AppendResult:
        stream_id, expected, events = batch.stream_id, batch.expected, batch.events
        code = expected if isinstance(expected, int) else _EXPECTED_CODES[expected]
        ids = [e.id for e in events]
        args = (
            stream_id,
            code,
            ids,
            [e.type for e in events],
            [e.schema_version for e in events],
            [e.data for e in events],
            batch.metadata,
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
