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
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from tidings import telemetry
from tidings.app.projections import Projection, ReadModel, View
from tidings.core.errors import (
    ConfigurationError,
    EventDecodeError,
    ProjectionError,
    StoreClosed,
    TidingsError,
)
from tidings.core.ids import uuid7
from tidings.core.lifecycle import AsyncResource
from tidings.store.base import EventStore, ProjectionConflict, StoreBase

__all__ = ["ProjectionRunner", "ProjectionStatus", "projection_status"]

log = logging.getLogger("tidings.projections")

_RETRY_FIRST, _RETRY_LONGEST = 0.1, 5.0  # seconds between retries after a store error

Progress = Callable[[str, int, int], None]
"""Called as `progress(projection name, position reached, target position)`."""


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


async def projection_status(store: EventStore) -> list[ProjectionStatus]:
    """The status of every projection with a checkpoint in `store` (no classes needed).

    Lag in events counts the log's events past the checkpoint; lag in seconds is the age of
    the oldest of them (0 when caught up).
    """
    store = _store(store)
    head = await store.last_position()
    out = []
    for state in await store.projection_states():
        lag_seconds = 0.0
        if state.position < head:
            async for record in store.read_all(after=state.position, limit=1):
                lag_seconds = max(0.0, (datetime.now(UTC) - record.recorded_at).total_seconds())
        out.append(
            ProjectionStatus(
                state.name,
                state.generation,
                state.position,
                head,
                max(0, head - state.position),
                lag_seconds,
                state.updated_at,
                state.building_generation is not None,
            )
        )
    return out


class _Worker:
    """One projection's loop: position, generation, and the errors it stopped on."""

    def __init__(self, runner: ProjectionRunner, projection: Projection) -> None:
        self.runner = runner
        self.projection = projection
        self.name = projection.name
        self.types = projection.types()
        self.generation = 1
        self.position = 0
        self.error: ProjectionError | EventDecodeError | None = None
        self.task: asyncio.Task[None] | None = None
        self.leased = False  # whether this runner holds the projection's lease (with leases)

    async def load(self) -> None:
        state = await self.runner.store.projection_state(self.name)
        self.generation, self.position = (
            (1, 0) if state is None else (state.generation, state.position)
        )

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
                    await self.apply(self.generation, self.position, records, scanned_to)
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
        view = View(store.document_reader(self.name, generation))
        with telemetry.projection_span(self.name, records, scanned_to):
            if records:
                await self.projection.apply(records, view)
            await store.commit_projection(
                self.name, generation, position, scanned_to, view.encoded()
            )

    async def forever(self) -> None:
        """Follow the log until cancelled; with a lease, only while this runner holds it."""
        if self.runner.lease is None:
            await self.follow()
            return
        ttl = self.runner.lease
        lease = f"projection:{self.name}"
        owner = self.runner.owner
        store = self.runner.store
        try:
            while True:
                if not await _quietly(store.acquire_lease(lease, owner, ttl)):
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
                        if not following.done() and not await _quietly(
                            store.acquire_lease(lease, owner, ttl)
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
                await asyncio.shield(_quietly(store.release_lease(lease, owner)))

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
            except (TidingsError, OSError) as exc:  # a locked or lost database: try again
                if self.position > reached:  # it worked since the last failure: a new outage
                    delay = _RETRY_FIRST
                log.warning("projection %s: %s; retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_LONGEST)


async def _quietly(call: Any) -> Any:
    """Await a lease call; a store error counts as "not held" (and is logged)."""
    try:
        return await call
    except (TidingsError, OSError) as exc:
        log.warning("lease: %s", exc)
        return False


class ProjectionRunner(AsyncResource):
    """Runs projections: in the background (`async with` / `start`) or on demand (`catch_up`).

    Args:
        store: the event store holding the log, the checkpoints and the read models.
        projections: projection instances, each with a distinct `name`.
        batch_size: events per transaction.
        lease: with several worker processes on one store, run each projection only while
            holding its lease for this many seconds (renewed every third of it). When its
            holder dies another runner takes over within about 1.3 x `lease`, from the
            committed checkpoint. None (the default) runs every projection here.
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
        self._workers: dict[str, _Worker] = {}
        items = [projections] if isinstance(projections, Projection) else list(projections)
        for projection in items:
            if not isinstance(projection, Projection):
                raise ConfigurationError(f"not a Projection instance: {projection!r}")
            if projection.name in self._workers:
                raise ConfigurationError(f"two projections are named {projection.name!r}")
            self._workers[projection.name] = _Worker(self, projection)
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
            for worker in self._workers.values():
                await worker.load()
                worker.task = asyncio.create_task(
                    worker.forever(), name=f"projection {worker.name}"
                )
        return self

    async def stop(self) -> None:
        """Stop the background work; what was committed stays committed."""
        self._running = False
        tasks = [w.task for w in self._workers.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in self._workers.values():
            worker.task = None

    async def run(self) -> None:
        """Run in the foreground until cancelled (e.g. as a worker's main task)."""
        await self.start()
        try:
            tasks = [w.task for w in self._workers.values() if w.task is not None]
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
            [self._worker(name) for name in projections]
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
                            await worker.load()  # another worker holds it: read its checkpoint
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
        worker = self._worker(name)
        running = worker.task is not None
        if running:
            assert worker.task is not None
            worker.task.cancel()
            await asyncio.gather(worker.task, return_exceptions=True)
            worker.task = None
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
                    0, types=worker.types, limit=self.batch_size
                ):
                    await worker.apply(generation, position, records, scanned_to)
                    position = scanned_to
                    if progress is not None:
                        progress(name, scanned_to, head)
                    if scanned_to >= head:
                        break
            await self.store.finish_rebuild(name, generation)
            worker.error = None
            await worker.load()
            self._advanced()
            return position
        finally:
            if running:
                worker.task = asyncio.create_task(worker.forever(), name=f"projection {name}")

    def read_model(self, projection: str | type[Projection] | Projection) -> ReadModel:
        """The query side of one of this runner's projections."""
        name = projection if isinstance(projection, str) else projection.name
        return ReadModel(self.store, self._worker(name).name)

    async def status(self) -> list[ProjectionStatus]:
        """The status of this runner's projections, with any error one stopped on."""
        mine = {s.name: s for s in await projection_status(self.store) if s.name in self._workers}
        head = await self.store.last_position()
        out = []
        for name, worker in self._workers.items():
            found = mine.get(name) or ProjectionStatus(name, 1, 0, head, head, 0.0, None, False)
            error = str(worker.error) if worker.error else None
            out.append(
                ProjectionStatus(
                    found.name,
                    found.generation,
                    found.position,
                    found.head,
                    found.lag_events,
                    found.lag_seconds,
                    found.updated_at,
                    found.rebuilding,
                    error,
                )
            )
        return out

    def leases(self) -> dict[str, bool]:
        """Whether this runner holds each projection's lease (all True without leases)."""
        return {
            name: worker.leased if self.lease is not None else worker.task is not None
            for name, worker in self._workers.items()
        }

    def _worker(self, name: str) -> _Worker:
        try:
            return self._workers[name]
        except KeyError:
            known = ", ".join(sorted(self._workers)) or "none"
            raise ConfigurationError(f"no projection named {name!r} here; known: {known}") from None


def _store(store: EventStore) -> StoreBase:
    if not isinstance(store, StoreBase):
        raise ConfigurationError(f"{type(store).__name__} cannot keep projection checkpoints")
    return store
