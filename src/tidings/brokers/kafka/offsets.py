"""A partition's commit point: the offset after the longest prefix of settled records."""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    """The offsets of one partition a member read, and its commit point.

    The commit point is the offset after the longest prefix of settled (acked, dead-lettered
    or passed over) offsets: committing it never skips a record still in work, whatever order
    the acks come in. Offsets must be read in increasing order; gaps are fine (compaction,
    transaction markers)."""

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # read, in order, not yet below the commit point
        self._settled: set[int] = set()
        self._position: int | None = None
        self.last: int | None = None  # the highest offset read

    def read(self, offset: int) -> None:
        if self.last is not None and offset <= self.last:
            raise ValueError(f"offset {offset} read after {self.last}")
        self._pending.append(offset)
        self.last = offset

    def settle(self, offset: int) -> int | None:
        """Mark `offset` done; the new commit point if it moved, else None."""
        if offset not in self._pending or offset in self._settled:
            return None
        self._settled.add(offset)
        moved = None
        while self._pending and self._pending[0] in self._settled:
            done = self._pending.popleft()
            self._settled.discard(done)
            moved = self._position = done + 1
        return moved

    @property
    def position(self) -> int | None:
        """Where the next owner should start: the first unsettled offset read, or after
        the last settled one; None before anything was read."""
        return self._pending[0] if self._pending else self._position
