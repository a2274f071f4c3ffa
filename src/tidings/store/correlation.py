"""Tracing: every event of one correlation (a request and all it caused), in order.

The default here scans the log, which is what the memory store uses; SQLite and PostgreSQL
override `_correlation_rows` with an indexed query.
"""

from __future__ import annotations

import json
from typing import Any

from tidings.core.recorded import RecordedEvent
from tidings.store.contracts import Row
from tidings.store.reading import Reading

__all__ = ["Correlation"]


class Correlation(Reading):
    """`read_correlation`."""

    async def read_correlation(
        self, correlation_id: str, *, limit: int = 10_000
    ) -> list[RecordedEvent[Any]]:
        """Every event of one correlation (a request and all it caused), in position order,
        at most `limit`; types without a class arrive as `UnknownEvent`. Indexed on SQLite
        and PostgreSQL; a scan of the log on the memory store."""
        self._check_open()
        rows = await self._correlation_rows(correlation_id, limit)
        keys = await self._keys_to_open(rows)
        return list(self._decode(rows, True, keys))

    async def _correlation_rows(self, correlation_id: str, limit: int) -> list[Row]:
        """The rows of one correlation; this default scans the log (backends index it)."""
        found: list[Row] = []
        after = 0
        needle = json.dumps(correlation_id, ensure_ascii=False)[1:-1]
        while len(found) < limit:
            batch, scanned = await self._read_all_batch(after, self.batch_size, None)
            for row in batch:
                meta = row[8]
                if (
                    meta
                    and needle in meta  # as the stored JSON writes it (quotes escaped)
                    and json.loads(meta).get("correlation_id") == correlation_id
                ):
                    found.append(row)
            if scanned <= after:
                break
            after = scanned
        return found[:limit]
