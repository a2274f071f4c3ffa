"""`Feed`: the loop that keeps one projection, or one segment of it, up to date.

A `ProjectionRunner` holds one `Feed` per projection, or per segment of a projection declared
with `segments=`. A feed reads the log from its checkpoint, applies the events of its own
streams (all of them, or those `segment_of` puts in its segment), and commits each batch with
its checkpoint in one transaction; with a lease, it runs only while its runner holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tidings import telemetry
from tidings.app.projections import Projection, View
from tidings.app.segments import quietly, segment_count, segment_of
from tidings.core.errors import (
    ConfigurationError,
    EventDecodeError,
    ProjectionError,
    StoreClosed,
    TidingsError,
)
from tidings.store.base import ProjectionConflict
from tidings.store.checkpoints import segment_name

if TYPE_CHECKING:
    from tidings.app.runner import ProjectionRunner

__all__ = ["Feed", "Progress", "check_segments"]

log = logging.getLogger("tidings.projections")

_RETRY_FIRST, _RETRY_LONGEST = 0.1, 5.0  # seconds between retries after a store error

Progress = Callable[[str, int, int], None]
"""Called as `progress(projection name, position reached, target position)`."""


class Feed:
    """One projection's (or segment's) loop: position, generation, the error it stopped on.

    `name` is its checkpoint row: the projection's name, or `name[k/n]` for segment k of n,
    whose documents are the projection's (`documents`)."""

    def __init__(
        self, runner: ProjectionRunner, projection: Projection, segment: int = 0, segments: int = 1
    ) -> None:
        self.runner = runner
        self.projection = projection
        self.segment, self.segments = segment, segments
        self.name = (
            segment_name(projection.name, segment, segments) if segments > 1 else projection.name
        )
        self.documents = projection.name if segments > 1 else None
        self.types = projection.types()
        self.generation = 1
        self.position = 0
        self.error: ProjectionError | EventDecodeError | None = None
        self.task: asyncio.Task[None] | None = None
        self.leased = False  # whether this runner holds the lease (with leases)

    @property
    def lease(self) -> str:
        return f"projection:{self.name}"

    async def load(self, *, check: bool = True) -> None:
        """Read the checkpoint; first make sure the store holds the projection with this
        segment count (`check_segments`)."""
        store = self.runner.store
        if check:
            await check_segments(store, self.projection)
        state = await store.projection_state(self.name)
        self.generation, self.position = (
            (1, 0) if state is None else (state.generation, state.position)
        )

    def mine(self, records: list[Any]) -> list[Any]:
        """The records of this feed's segment."""
        if self.segments == 1:
            return records
        k, n = self.segment, self.segments
        return [r for r in records if segment_of(r.stream_id, n) == k]

    async def run_until(self, target: int | None, progress: Progress | None = None) -> None:
        """Apply batches until `target` (None: forever), reloading on a moved checkpoint."""
        store = self.runner.store
        while True:
            await self.load()
            if target is not None and self.position >= target:
                return
            try:
                async for records, scanned_to in store.subscribe_batches(
                    self.position, types=self.types, limit=self.runner.batch_size
                ):
                    await self.apply(self.generation, self.position, self.mine(records), scanned_to)
                    self.position = scanned_to
                    self.runner._advanced()
                    if progress is not None:
                        progress(self.name, scanned_to, target or scanned_to)
                    if target is not None and scanned_to >= target:
                        return
            except ProjectionConflict as exc:
                log.info("%s; reloading its checkpoint", exc)

    async def apply(
        self, generation: int, position: int, records: list[Any], scanned_to: int
    ) -> None:
        store = self.runner.store
        view = View(store.document_reader(self.projection.name, generation))
        with telemetry.projection_span(self.name, records, scanned_to):
            if records:
                await self.projection.apply(records, view)
            await store.commit_projection(
                self.name,
                generation,
                position,
                scanned_to,
                view.encoded(),
                documents=self.documents,
            )

    async def forever(self) -> None:
        """Follow the log until cancelled; with a lease, only while this runner holds it."""
        if self.runner.lease is None:
            await self.follow()
            return
        ttl = self.runner.lease
        owner = self.runner.owner
        store = self.runner.store
        try:
            while True:
                if not await quietly(store.acquire_lease(self.lease, owner, ttl)):
                    self.leased = False
                    await asyncio.sleep(ttl / 3)
                    continue
                self.leased = True
                log.info("%s holds the lease on projection %s", owner, self.name)
                following = asyncio.create_task(self.follow())
                lost = False
                try:
                    while not following.done():
                        await asyncio.wait({following}, timeout=ttl / 3)
                        if not following.done() and not await quietly(
                            store.acquire_lease(self.lease, owner, ttl)
                        ):
                            log.warning("%s lost the lease on projection %s", owner, self.name)
                            lost = True
                            break
                finally:
                    if not following.done():
                        following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    self.leased = False
                if not lost:
                    return  # it stopped by itself: a handler error, or the store closed
        finally:
            self.leased = False
            if not store._closed:
                await asyncio.shield(quietly(store.release_lease(self.lease, owner)))

    async def follow(self) -> None:
        """Apply new events as they come; a handler error or an event that cannot be decoded
        stops it, a store error is retried."""
        delay = _RETRY_FIRST
        while True:
            reached = self.position
            try:
                await self.run_until(None)
            except (ProjectionError, EventDecodeError) as exc:  # a stored event it cannot
                # decode stays undecodable: stop on it, named, as on a handler's error
                self.error = exc
                log.error("projection stopped: %s", exc)
                self.runner._advanced()
                return
            except StoreClosed:
                return
            except ConfigurationError:
                raise  # a segment count that changed under it: nothing to retry
            except (TidingsError, OSError) as exc:  # a locked or lost database: try again
                if self.position > reached:  # it worked since the last failure: a new outage
                    delay = _RETRY_FIRST
                log.warning("projection %s: %s; retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_LONGEST)


async def check_segments(store: Any, projection: Projection) -> None:
    """Refuse to run `projection` with another segment count than the live one it has in
    the store: a live projection's count changes only by a rebuild."""
    name, wanted = projection.name, projection.segments
    states = {state.name: state for state in await store.projection_states()}
    stored = {found[1] for row in states if (found := segment_count(row, name)) is not None}
    main = states.get(name)
    if stored:
        have = stored.pop() if len(stored) == 1 else -1
    else:
        have = 1 if main is not None and (main.position > 0 or main.generation > 1) else wanted
    if have != wanted:
        said = "several" if have == -1 else str(have)
        raise ConfigurationError(
            f"projection {name!r} is stored with {said} segment(s), and "
            f"{type(projection).__name__} says segments={wanted}: a live projection changes its "
            f"segment count only by a rebuild, which builds the new count beside the old one "
            f"(ProjectionRunner.rebuild({name!r}), or `tidings projections rebuild {name}`)"
        )
