"""Projection checkpoints: where each projection stands, and how a commit may move it.

`ProjectionState` is the checkpoint row (live generation, and the one a blue/green rebuild
fills); `advance_projection`, `begin_rebuild` and `swap_rebuild` are the rules for changing
it, which every backend calls inside its own transaction, so they are written once.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from tidings.core.errors import TidingsError
from tidings.store.core import StoreCore

__all__ = [
    "Checkpoints",
    "ProjectionCommit",
    "ProjectionConflict",
    "ProjectionState",
    "advance_projection",
    "begin_rebuild",
    "documents_owner",
    "segment_name",
    "segment_rows",
    "swap_rebuild",
]


def segment_name(name: str, segment: int, segments: int) -> str:
    """The checkpoint row of one segment of projection `name`: `name[segment/segments]`."""
    return f"{name}[{segment}/{segments}]"


def segment_prefix(name: str) -> str:
    """What every segment row of projection `name` starts with."""
    return f"{name}["


@dataclass(frozen=True, slots=True)
class ProjectionState:
    """Where a projection stands: its live read model and, during a rebuild, the new one.

    `generation` numbers the copy of the read model that queries read; `position` is the last
    event applied to it. A blue/green rebuild fills `building_generation` up to
    `building_position`, then swaps it in as the live generation in one transaction.
    """

    name: str
    generation: int
    position: int
    updated_at: datetime | None = None
    building_generation: int | None = None
    building_position: int = 0

    def position_of(self, generation: int) -> int:
        """The checkpoint of the given generation (live or building)."""
        if generation == self.generation:
            return self.position
        if generation == self.building_generation:
            return self.building_position
        raise ProjectionConflict(self.name, f"generation {generation} is neither live nor building")


class ProjectionConflict(TidingsError):
    """A projection checkpoint moved under a runner (another runner, or a swap): reload it."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"projection {name!r}: {detail}")


@dataclass(frozen=True, slots=True)
class ProjectionCommit:
    """One `commit_projection`: move `generation` from `expected_position` to `position`,
    applying document `writes` (key to JSON, or None to delete)."""

    name: str
    generation: int
    expected_position: int
    position: int
    writes: Mapping[str, str | None]
    documents: str | None = None
    """The projection whose documents `writes` go to, when `name` is one of its segments'
    checkpoints (None: `name`'s own)."""


def advance_projection(
    current: ProjectionState | None, commit: ProjectionCommit, now: datetime
) -> ProjectionState:
    """The checkpoint row after `commit`, or `ProjectionConflict` if the commit is stale.

    Backends call this inside their transaction with the row they just read, so the rule
    for what may move a checkpoint lives in one place.
    """
    name, generation, position = commit.name, commit.generation, commit.position
    expected_position = commit.expected_position
    if current is None:
        if generation != 1 or expected_position != 0:
            raise ProjectionConflict(name, "has no checkpoint yet; a first commit starts at 0")
        return ProjectionState(name, 1, position, now)
    if position < expected_position:
        raise ProjectionConflict(name, f"a checkpoint cannot move back to {position}")
    actual = current.position_of(generation)
    if actual != expected_position:
        raise ProjectionConflict(
            name, f"generation {generation} is at {actual}, not {expected_position}"
        )
    if generation == current.generation:
        return dataclasses.replace(current, position=position, updated_at=now)
    return dataclasses.replace(current, building_position=position, updated_at=now)


def documents_owner(
    main: ProjectionState | None, commit: ProjectionCommit, now: datetime
) -> ProjectionState | None:
    """For a segment's commit: the projection's own row to create (its first commit), or
    None when it stands; `ProjectionConflict` when the segment writes a generation that is
    neither live nor being rebuilt (a rebuild swapped it out)."""
    assert commit.documents is not None
    if main is None:
        if commit.generation != 1:
            raise ProjectionConflict(commit.name, "its projection has no checkpoint")
        return ProjectionState(commit.documents, 1, 0, now)
    if commit.generation not in (main.generation, main.building_generation):
        raise ProjectionConflict(
            commit.name, f"generation {commit.generation} of its projection's documents is gone"
        )
    return None


def segment_rows(
    name: str, segments: int, generation: int, position: int, now: datetime
) -> list[ProjectionState]:
    """The checkpoint rows of `segments` segments (none for 1), all at `position`."""
    if segments <= 1:
        return []
    return [
        ProjectionState(segment_name(name, k, segments), generation, position, now)
        for k in range(segments)
    ]


def begin_rebuild(current: ProjectionState | None, name: str, now: datetime) -> ProjectionState:
    """The checkpoint row with a new, empty building generation."""
    if current is None:
        current = ProjectionState(name, 1, 0, now)
    newest = max(current.generation, current.building_generation or 0)
    return dataclasses.replace(
        current, building_generation=newest + 1, building_position=0, updated_at=now
    )


def swap_rebuild(
    current: ProjectionState | None, name: str, generation: int, now: datetime
) -> ProjectionState:
    """The checkpoint row once the rebuilt `generation` is live."""
    if current is None or current.building_generation != generation:
        raise ProjectionConflict(name, f"generation {generation} is not being rebuilt")
    return ProjectionState(name, generation, current.building_position, now)


class Checkpoints(StoreCore):
    """Reading and moving projection checkpoints, and the blue/green rebuild swap."""

    async def projection_state(self, name: str) -> ProjectionState | None:
        """The checkpoint row of projection `name`, None before its first commit."""
        self._check_open()
        states = await self._projection_states(name)
        return states[0] if states else None

    async def projection_states(self) -> list[ProjectionState]:
        """Every projection's checkpoint row, by name."""
        self._check_open()
        return await self._projection_states(None)

    async def commit_projection(
        self,
        name: str,
        generation: int,
        expected_position: int,
        position: int,
        writes: Mapping[str, str | None],
        *,
        documents: str | None = None,
    ) -> None:
        """Apply document `writes` (key to JSON, or None to delete) and move the checkpoint of
        `generation` from `expected_position` to `position`, in one transaction.

        `documents` names the projection whose documents these are when `name` is the
        checkpoint of one of its segments. A checkpoint that is no longer at
        `expected_position` (another runner got there, or a rebuild swapped generations)
        raises `ProjectionConflict` and changes nothing.
        """
        self._check_open()
        await self._commit_projection(
            ProjectionCommit(name, generation, expected_position, position, writes, documents)
        )

    async def start_rebuild(self, name: str) -> ProjectionState:
        """Open a fresh, empty generation for `name` to be rebuilt into beside the live one."""
        self._check_open()
        return await self._start_rebuild(name)

    async def finish_rebuild(self, name: str, generation: int, *, segments: int = 1) -> None:
        """Make the rebuilt `generation` live and drop the old one, in one transaction; with
        `segments` above 1, the projection's segment checkpoints are made anew (that many,
        each at the rebuilt position) in the same transaction."""
        self._check_open()
        if segments < 1:
            raise ValueError(f"segments must be at least 1, not {segments}")
        await self._finish_rebuild(name, generation, segments)

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    async def _projection_states(self, name: str | None) -> list[ProjectionState]:
        """The checkpoint row of `name`, or of every projection when None."""

    @abstractmethod
    async def _commit_projection(self, commit: ProjectionCommit) -> None:
        """Write documents and move a checkpoint atomically; `ProjectionConflict` if moved.

        The first commit of a projection (no row yet) creates it at generation 1."""

    @abstractmethod
    async def _start_rebuild(self, name: str) -> ProjectionState:
        """Set `building_generation` to a new, empty generation at position 0."""

    @abstractmethod
    async def _finish_rebuild(self, name: str, generation: int, segments: int) -> None:
        """Swap `generation` in as live with its checkpoint; delete the old documents and
        every segment row of `name`; write `segment_rows(...)` for `segments`."""
