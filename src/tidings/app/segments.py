"""Segments: one projection split across workers by a stable hash of the stream id.

`class OrderSummaries(Projection, name="order_summaries", segments=4)` gives the projection
four segments. An event belongs to segment `segment_of(stream_id, 4)`: the first 8 bytes of the
BLAKE2b digest of the stream id's UTF-8 bytes, as a big-endian unsigned integer, modulo the
segment count; the same in every process and every release. A stream lives in one segment, so
its events are applied in order; each segment has its own checkpoint (`name[k/n]`) and lease.

`ProjectionRunner`s with `lease=` divide the segments among themselves (`Balancer`): each
runner holds a membership lease per projection, and on every renewal (a third of the lease)
gives back any segment beyond its fair share (the segment count over the live members,
rounded up) or more than one above the least loaded member, and, when it is itself among the
least loaded, takes free segments up to its fair share. Two
runners with four segments settle at two each within a few renewals, a third takes its share,
and the segments of one that died are free once its leases expire and are taken at the next
renewal: within about 1.3 leases.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from tidings.core.errors import TidingsError

__all__ = ["Balancer", "quietly", "segment_of"]

log = logging.getLogger("tidings.projections")


@functools.lru_cache(maxsize=65_536)  # per event of a segmented feed: a stream recurs
def segment_of(stream_id: str, segments: int) -> int:
    """The segment (0 to `segments` - 1) that `stream_id`'s events belong to."""
    if segments <= 1:
        return 0
    digest = hashlib.blake2b(stream_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % segments


def segment_count(row: str, name: str) -> tuple[int, int] | None:
    """`(segment, segments)` when checkpoint row `row` is one of projection `name`'s."""
    prefix = f"{name}["
    if not (row.startswith(prefix) and row.endswith("]")):
        return None
    part, _, whole = row[len(prefix) : -1].partition("/")
    if not (part.isdigit() and whole.isdigit()):
        return None
    return int(part), int(whole)


class Balancer:
    """Runs this runner's fair share of one projection's segments, by lease.

    `followers[k]()` starts following segment k (a task that returns only on an error or
    when the store closes); the balancer cancels it when the segment goes to another runner.
    """

    def __init__(
        self,
        store: Any,
        name: str,
        segments: int,
        owner: str,
        ttl: float,
        start: Callable[[int], asyncio.Task[None]],
        held: Callable[[int, bool], None],
    ) -> None:
        self.store, self.name, self.segments = store, name, segments
        self.owner, self.ttl = owner, ttl
        self._start, self._held = start, held
        self._running: dict[int, asyncio.Task[None]] = {}

    def lease(self, segment: int) -> str:
        return f"projection:{self.name}[{segment}/{self.segments}]"

    @property
    def _member(self) -> str:
        return f"projection:{self.name}:member:{self.owner}"

    async def run(self) -> None:
        """Balance until cancelled, or until a segment stops by itself (an error)."""
        try:
            while True:
                await self._balance()
                done = [k for k, task in self._running.items() if task.done()]
                if done:
                    return  # a handler error, or the store closed: the runner reports it
                await asyncio.sleep(self.ttl / 3)
        finally:
            held = list(self._running)
            for k in held:
                await self._stop(k)
            if not self.store._closed:  # let the others take over at once, not at expiry
                leases = [self._member, *(self.lease(k) for k in held)]
                await asyncio.shield(self._release(leases))

    async def _release(self, leases: list[str]) -> None:
        for lease in leases:
            await quietly(self.store.release_lease(lease, self.owner))

    async def _balance(self) -> None:
        store, owner = self.store, self.owner
        await quietly(store.acquire_lease(self._member, owner, self.ttl))
        members_found = await quietly(store.lease_owners(f"projection:{self.name}:member:"))
        held_found = await quietly(store.lease_owners(f"projection:{self.name}["))
        if members_found is False or held_found is False:
            return  # the store is unreachable: keep what runs, try again next time
        members = set(members_found.values()) | {owner}
        held = {k: held_found.get(self.lease(k)) for k in range(self.segments)}
        for k in list(self._running):  # renew, or let go of what is no longer ours
            if held.get(k) != owner or not await quietly(
                store.acquire_lease(self.lease(k), owner, self.ttl)
            ):
                await self._stop(k)
                held[k] = None
        counts = Counter(o for o in held.values() if o is not None and o in members)
        fair = math.ceil(self.segments / len(members))
        least = min(counts.get(m, 0) for m in members)
        mine = sorted(k for k in self._running)
        gave = False
        while mine and (len(mine) > fair or len(mine) > least + 1):
            k = mine.pop()
            await self._stop(k)
            await quietly(store.release_lease(self.lease(k), owner))
            held[k], gave = None, True
        if gave or len(mine) > least:
            return  # what is free now is for the least loaded members to take
        free = [k for k in range(self.segments) if held.get(k) in (None, owner) and k not in mine]
        for k in free:
            if len(mine) >= fair:
                break
            if await quietly(store.acquire_lease(self.lease(k), owner, self.ttl)):
                log.info("%s takes segment %d/%d of %s", owner, k, self.segments, self.name)
                self._running[k] = self._start(k)
                self._held(k, True)
                mine.append(k)

    async def _stop(self, k: int) -> None:
        task = self._running.pop(k, None)
        self._held(k, False)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def quietly(call: Any) -> Any:
    """Await a lease call; a store error counts as "not held" (and is logged)."""
    try:
        return await call
    except (TidingsError, OSError) as exc:
        log.warning("lease: %s", exc)
        return False
