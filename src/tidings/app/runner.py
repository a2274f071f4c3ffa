"""`ProjectionRunner`: keep projections up to date from the store's global log.

Each projection is fed from `store.subscribe_batches()` and each batch is committed with its
checkpoint in one transaction (`store.commit_projection`). A checkpoint that moved under the
runner (another runner on the same projection, or a rebuild swapping generations) is reloaded,
never overwritten, so no event is applied twice to one generation.

```python
async with ProjectionRunner(store, [OrdersByUser()]) as runner:   # runs in the background
    result = await repo.save(order)
    await runner.wait_for(result.position)                          # read your own write
    orders = await ReadModel(store, OrdersByUser).get("user-1")
```
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from tidings.app.feed import Feed, Progress
from tidings.app.projections import Projection, ReadModel
from tidings.app.segments import Balancer, segment_count
from tidings.core.errors import ConfigurationError
from tidings.core.ids import uuid7
from tidings.core.lifecycle import AsyncResource
from tidings.store.base import EventStore, StoreBase

__all__ = ["ProjectionRunner", "ProjectionStatus", "projection_status"]

log = logging.getLogger("tidings.projections")


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """Where a projection stands against the head of the log."""

    name: str
    generation: int
    position: int
    head: int
    lag_events: int
    lag_seconds: float
    updated_at: datetime | None
    rebuilding: bool
    error: str | None = None
    owner: str | None = None
    """The runner holding its lease (with leases), or running it here (without)."""
    segment: int | None = None
    """Which segment of the projection this row is (None: it has no segments)."""
    segments: int = 1


async def projection_status(store: EventStore) -> list[ProjectionStatus]:
    """The status of every projection with a checkpoint in `store` (no classes needed), one
    row per segment of a projection with segments, each with the owner of its lease.

    Lag in events counts the log's events past the checkpoint; lag in seconds is the age of
    the oldest of them (0 when caught up).
    """
    store = _store(store)
    head = await store.last_position()
    states = await store.projection_states()
    owners = await store.lease_owners("projection:")
    names = {state.name for state in states}
    out = []
    for state in states:
        name, segment, segments = state.name, None, 1
        if "[" in state.name:
            base = state.name[: state.name.index("[")]
            found = segment_count(state.name, base)
            if found is not None:
                name, (segment, segments) = base, found
        elif any(row.startswith(f"{state.name}[") for row in names):
            continue  # a segmented projection's own row: its segments' rows stand for it
        lag_seconds = 0.0
        if state.position < head:
            async for record in store.read_all(after=state.position, limit=1):
                lag_seconds = max(0.0, (datetime.now(UTC) - record.recorded_at).total_seconds())
        out.append(
            ProjectionStatus(
                name,
                state.generation,
                state.position,
                head,
                max(0, head - state.position),
                lag_seconds,
                state.updated_at,
                state.building_generation is not None,
                owner=owners.get(f"projection:{state.name}"),
                segment=segment,
                segments=segments,
            )
        )
    return out


class ProjectionRunner(AsyncResource):
    """Runs projections: in the background (`async with` / `start`) or on demand (`catch_up`).

    Args:
        store: the event store holding the log, the checkpoints and the read models.
        projections: projection instances, each with a distinct `name`.
        batch_size: events per transaction.
        lease: with several worker processes on one store, run each projection (each
            segment of one declared with `segments=`) only while holding its lease for this
            many seconds (renewed every third of it); runners divide a projection's segments
            fairly among themselves. When a holder dies another runner takes over within about
            1.3 x `lease`, from the committed checkpoint. None (the default) runs every
            projection, every segment, here.
        owner: this runner's name in the lease table (default: host, pid and a random part).
    """

    def __init__(
        self,
        store: EventStore,
        projections: Projection | Iterable[Projection],
        *,
        batch_size: int = 500,
        lease: float | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = _store(store)
        self.batch_size = batch_size
        if lease is not None and lease <= 0:
            raise ConfigurationError(f"lease must be a positive number of seconds, not {lease}")
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid7().hex[-8:]}"
        self._workers: dict[str, Feed] = {}  # by checkpoint row: a projection, or a segment
        self._feeds: dict[str, list[Feed]] = {}  # by projection name
        self._balancers: dict[str, asyncio.Task[None]] = {}
        items = [projections] if isinstance(projections, Projection) else list(projections)
        for projection in items:
            if not isinstance(projection, Projection):
                raise ConfigurationError(f"not a Projection instance: {projection!r}")
            if projection.name in self._feeds:
                raise ConfigurationError(f"two projections are named {projection.name!r}")
            n = projection.segments
            # Segments run at once: each applies through its own copy (its own `view`).
            copies = [projection, *(copy.copy(projection) for _ in range(n - 1))]
            feeds = [Feed(self, copies[k], k, n) for k in range(n)]
            self._feeds[projection.name] = feeds
            self._workers.update((feed.name, feed) for feed in feeds)
        self._changed = asyncio.Event()
        self._running = False

    @property
    def projections(self) -> list[Projection]:
        """The projections this runner feeds."""
        return [worker.projection for worker in self._workers.values()]

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start feeding every projection in the background until `stop`."""
        if not self._running:
            self._running = True
            for name in self._feeds:
                await self._start_feeds(name)
        return self

    async def _start_feeds(self, name: str) -> None:
        """Start one projection: each feed on its own, or its segments by a `Balancer`."""
        feeds = self._feeds[name]
        for feed in feeds:
            await feed.load()
        if self.lease is None or len(feeds) == 1:
            for feed in feeds:
                feed.task = asyncio.create_task(feed.forever(), name=f"projection {feed.name}")
            return

        def start(k: int) -> asyncio.Task[None]:
            task = asyncio.create_task(feeds[k].follow(), name=f"projection {feeds[k].name}")
            feeds[k].task = task
            return task

        def held(k: int, holding: bool) -> None:
            feeds[k].leased = holding
            if not holding:
                feeds[k].task = None

        balancer = Balancer(self.store, name, len(feeds), self.owner, self.lease, start, held)
        self._balancers[name] = asyncio.create_task(balancer.run(), name=f"segments of {name}")

    async def _stop_feeds(self, name: str) -> bool:
        """Stop one projection's background work; whether it was running."""
        tasks = [feed.task for feed in self._feeds[name] if feed.task is not None]
        balancer = self._balancers.pop(name, None)
        tasks += [balancer] if balancer is not None else []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for feed in self._feeds[name]:
            feed.task = None
            feed.leased = False
        return bool(tasks)

    async def stop(self) -> None:
        """Stop the background work; what was committed stays committed."""
        self._running = False
        for name in self._feeds:
            await self._stop_feeds(name)

    async def run(self) -> None:
        """Run in the foreground until cancelled (e.g. as a worker's main task)."""
        await self.start()
        try:
            tasks = [*self._balancers.values()]
            tasks += [w.task for w in self._workers.values() if w.task is not None]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # one stopped
            for worker in self._workers.values():
                if worker.error is not None:
                    raise worker.error
            for task in done:  # one that crashed: say so, rather than return as if stopped
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await self.stop()

    async def open(self) -> Self:
        """`async with runner:` starts it (`AsyncResource`)."""
        return await self.start()

    async def aclose(self) -> None:
        """Leaving `async with runner:` stops it."""
        await self.stop()

    # -- catching up and waiting -----------------------------------------------------------

    async def catch_up(self, *, progress: Progress | None = None) -> int:
        """Apply every event up to the head of the log as it is now; returns that position.

        With the runner started this waits for the background work instead.
        """
        head = await self.store.last_position()
        if self._running:
            await self.wait_for(head, timeout=None)
            return head
        for worker in self._workers.values():
            await worker.run_until(head, progress)
        return head

    async def wait_for(
        self,
        position: int,
        *,
        projections: Iterable[str] | None = None,
        timeout: float | None = 10.0,
    ) -> None:
        """Return once the projections (all, or those named) have applied `position`.

        This is read-your-writes: append, then wait for the append's position before
        querying. Raises `TimeoutError` after `timeout` seconds, or the `ProjectionError` a
        projection stopped on.
        """
        workers = (
            [feed for name in projections for feed in self._projection_feeds(name)]
            if projections
            else list(self._workers.values())
        )
        if not self._running:

            async def reached() -> None:
                for worker in workers:
                    await worker.run_until(position)

        else:

            async def reached() -> None:
                while True:
                    self._changed.clear()
                    for worker in workers:
                        if worker.error is not None:
                            raise worker.error
                        if self.lease is not None and not worker.leased:
                            await worker.load(check=False)  # another holds it: its checkpoint
                    if all(worker.position >= position for worker in workers):
                        return
                    try:  # with leases, other processes move checkpoints: look again soon
                        async with asyncio.timeout(self.lease and 0.05):
                            await self._changed.wait()
                    except TimeoutError:
                        pass

        try:
            async with asyncio.timeout(timeout):
                await reached()
        except TimeoutError:
            behind = ", ".join(
                f"{w.name} at {w.position}" for w in workers if w.position < position
            )
            raise TimeoutError(
                f"projections not at position {position} after {timeout}s: {behind}"
            ) from None

    def _advanced(self) -> None:
        self._changed.set()

    # -- rebuilding and reading ------------------------------------------------------------

    async def rebuild(
        self, projection: str | type[Projection], *, progress: Progress | None = None
    ) -> int:
        """Rebuild one projection from the start of the log, blue/green.

        The new read model is built in a fresh generation while the old one keeps serving
        queries; when it has caught up with the head it is swapped in, in one transaction.
        Returns the position the new model is at.
        """
        name = projection if isinstance(projection, str) else projection.name
        feeds = self._projection_feeds(name)
        running = await self._stop_feeds(name)
        # The whole log into the new generation, here, unsegmented; then the swap makes the
        # projection's segment checkpoints anew, as many as its class says now.
        builder = Feed(self, feeds[0].projection)
        try:
            state = await self.store.start_rebuild(name)
            generation = state.building_generation
            assert generation is not None
            head = await self.store.last_position()
            position = 0
            if progress is not None:
                progress(name, 0, head)
            if head > 0:
                async for records, scanned_to in self.store.subscribe_batches(
                    0, types=builder.types, limit=self.batch_size
                ):
                    await builder.apply(generation, position, records, scanned_to)
                    position = scanned_to
                    if progress is not None:
                        progress(name, scanned_to, head)
                    if scanned_to >= head:
                        break
            await self.store.finish_rebuild(name, generation, segments=len(feeds))
            for feed in feeds:
                feed.error = None
                await feed.load()
            self._advanced()
            return position
        finally:
            if running:
                await self._start_feeds(name)

    def read_model(self, projection: str | type[Projection] | Projection) -> ReadModel:
        """The query side of one of this runner's projections."""
        name = projection if isinstance(projection, str) else projection.name
        return ReadModel(self.store, self._projection_feeds(name)[0].projection.name)

    async def status(self) -> list[ProjectionStatus]:
        """The status of this runner's projections, one row per segment, with the owner of
        each (this runner without leases) and any error one stopped on."""
        found = {
            (s.name, s.segment): s
            for s in await projection_status(self.store)
            if s.name in self._feeds
        }
        head = await self.store.last_position()
        out = []
        for name, feeds in self._feeds.items():
            for feed in feeds:
                segment = feed.segment if feed.segments > 1 else None
                row = found.get((name, segment)) or ProjectionStatus(
                    name, 1, 0, head, head, 0.0, None, False
                )
                owner = (
                    row.owner
                    if self.lease is not None
                    else (self.owner if feed.task is not None else None)
                )
                out.append(
                    dataclasses.replace(
                        row,
                        error=str(feed.error) if feed.error else None,
                        owner=owner,
                        segment=segment,
                        segments=feed.segments,
                    )
                )
        return out

    def leases(self) -> dict[str, bool]:
        """Whether this runner holds each projection's (or segment's) lease, by checkpoint
        name (without leases: whether it runs it)."""
        return {
            name: worker.leased if self.lease is not None else worker.task is not None
            for name, worker in self._workers.items()
        }

    def _projection_feeds(self, name: str) -> list[Feed]:
        try:
            return self._feeds[name]
        except KeyError:
            known = ", ".join(sorted(self._feeds)) or "none"
            raise ConfigurationError(f"no projection named {name!r} here; known: {known}") from None


def _store(store: EventStore) -> StoreBase:
    if not isinstance(store, StoreBase):
        raise ConfigurationError(f"{type(store).__name__} cannot keep projection checkpoints")
    return store
