"""Appending to the PostgreSQL store: one round trip to the `tidings_append` function, which
locks the stream's row, checks the expected version and draws positions; a lost connection is
retried once with the same ids, and a retry of stored events is told from a clash.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tidings.core.codec import TAG_SEPARATOR, EncodedEvent
from tidings.core.errors import StoreError, WrongExpectedVersion
from tidings.store.appending import Condition, EncodedAppend
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
_MAX_KEYS = 64  # advisory keys an append takes at most; a larger one takes the bulk key


class PostgresAppending(PostgresSubscriptions):
    """`_append` (which announces each commit to other processes' subscribers)."""

    async def _append(self, batch: EncodedAppend) -> AppendResult:
        stream_id, expected, events = batch.stream_id, batch.expected, batch.events
        code = expected if isinstance(expected, int) else _EXPECTED_CODES[expected]
        ids = [e.id for e in events]
        condition = batch.condition
        locks, exclusive = _locks(self.schema, events, condition)
        args = (
            stream_id,
            code,
            ids,
            [e.type for e in events],
            [e.schema_version for e in events],
            [e.data for e in events],
            batch.metadata,
            [TAG_SEPARATOR.join(e.tags) if e.tags else None for e in events],
            locks,
            exclusive,
            _query_json(condition),
            condition.after if condition is not None else 0,
        )
        sql = (
            "SELECT ok, version, last_position, conflict_position, conflict_type "
            f"FROM {self._s}.tidings_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        )
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                async with self._connection() as conn:
                    try:
                        ok, version, position, conflict, kind = await conn.fetchrow(sql, *args)
                    except asyncpg.UniqueViolationError:
                        found = await self._find_ids(conn, ids)
                        if not found:
                            raise
                        return resolve_duplicates(stream_id, ids, found)
                    if ok:
                        self._announce()
                        return AppendResult(version=version, position=position)
                    if conflict is not None and condition is not None:
                        raise condition.failed(stream_id, conflict, kind)  # (ids not stored)
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


@functools.lru_cache(maxsize=4096)  # `*`, `bulk` and the types recur on every append
def _key(schema: str, name: str) -> int:
    """A signed 64-bit advisory-lock key for `name` in this schema (stable across
    processes and releases: a hash, not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"tidings\x1f{schema}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _locks(
    schema: str, events: list[EncodedEvent], condition: Condition | None
) -> tuple[list[int], list[bool]]:
    """The advisory keys an append takes, sorted, and which it takes exclusively.

    Every append takes, shared, the key `*` and a key per type and per tag of its events.
    A conditioned append takes, exclusively, what its query's events would hold: `*` for a
    query of everything, the first tag of each item with tags (every matching event has
    it), else a key per type; and the `bulk` key shared. An append with over `_MAX_KEYS`
    types and tags takes `bulk` exclusively instead of them. So a checker and a writer of a
    matching event always meet on one key, one of them exclusive; nothing else waits.
    """
    shared = {"type:" + e.type for e in events}
    shared.update("tag:" + tag for e in events for tag in e.tags)
    wanted: dict[str, bool] = {}
    if len(shared) > _MAX_KEYS:
        wanted["bulk"] = True
    else:
        wanted.update(dict.fromkeys(shared, False))
    wanted["*"] = False
    if condition is not None:
        wanted.setdefault("bulk", False)
        if condition.selection is None:
            wanted["*"] = True
        else:
            for names, tags in condition.selection.items:
                for name in [f"tag:{tags[0]}"] if tags else [f"type:{t}" for t in names or ()]:
                    wanted[name] = True
    keyed = sorted((_key(schema, name), mode) for name, mode in wanted.items())
    return [key for key, _ in keyed], [mode for _, mode in keyed]


def _query_json(condition: Condition | None) -> str | None:
    """The condition's selection as the append function reads it: a JSON list of items
    `{"types": [...] or null, "tags": [...]}`; `[{"types": null, "tags": []}]` selects all."""
    if condition is None:
        return None
    if condition.selection is None:
        return '[{"types": null, "tags": []}]'
    return json.dumps(
        [
            {"types": sorted(names) if names is not None else None, "tags": list(tags)}
            for names, tags in condition.selection.items
        ]
    )
