"""Snapshots: an aggregate's state saved at a stream version, so loading need not replay it.

The `Snapshot` value and the store methods that save and find one; backends supply the two
storage primitives. Snapshots are caches: the events remain the truth.
"""

from __future__ import annotations

from abc import abstractmethod
from datetime import datetime
from typing import NamedTuple

from tidings.store.core import StoreCore
from tidings.store.validation import _int64, validate_stream_id

__all__ = ["Snapshot", "Snapshots"]


class Snapshot(NamedTuple):
    """An aggregate's state saved at a stream version, so loading need not replay it all.

    `type` names the aggregate class and `schema_version` its state layout; a snapshot whose
    layout does not match the class is ignored, since the events remain the truth.
    """

    stream_id: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: str


class Snapshots(StoreCore):
    """Saving and reading snapshots, with the stream id checked like everywhere else."""

    async def save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        """Keep `data` as the state of `stream_id` at `version` (a later save of the same
        version replaces it)."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        await self._save_snapshot(stream_id, version, type, schema_version, data)

    async def read_snapshot(
        self,
        stream_id: str,
        *,
        max_version: int | None = None,
        recorded_until: datetime | None = None,
    ) -> Snapshot | None:
        """The newest snapshot of `stream_id` at or below `max_version` and taken no later
        than `recorded_until`; None when there is none."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        top = None if max_version is None else _int64(max_version)
        return await self._read_snapshot(stream_id, top, recorded_until)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _save_snapshot(
        self, stream_id: str, version: int, type: str, schema_version: int, data: str
    ) -> None:
        """Store one snapshot, replacing one at the same version."""

    @abstractmethod
    async def _read_snapshot(
        self, stream_id: str, max_version: int | None, recorded_until: datetime | None
    ) -> Snapshot | None:
        """The newest snapshot within the bounds, or None."""
