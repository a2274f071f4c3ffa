"""`OutboxRelay`: an event reaches its broker if and only if it was stored.

The store's global log is the outbox. A relay follows it from a checkpoint kept in the store
(the projection checkpoint `outbox:<name>`), publishes each event under its own id (so a
re-publish is recognisably the same message: NATS drops it by `Nats-Msg-Id`, an inbox skips
it), keyed by its stream id (so a stream's events reach each group in order), and moves the
checkpoint only after the broker confirmed. Killed at any moment it loses nothing; at worst
the last batch goes out twice, with the same ids.

Several relays on one store take turns through a lease (`outbox:<name>` in the lease table):
one publishes, the others wait and take over within about 1.3 x `lease` after it dies.

```python
relay = OutboxRelay(store, broker, routes({"order.*": "orders", "category:account": "ledger"}))
await relay.run()          # or, from a shell: tidings relay --store URL --broker URL --route ...
```
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tidings.brokers.base import BrokerBase
from tidings.core.errors import ConfigurationError, StoreClosed, TidingsError
from tidings.core.ids import uuid7
from tidings.core.recorded import RecordedEvent
from tidings.store.base import EventStore, ProjectionConflict, StoreBase

__all__ = ["OutboxRelay", "Route", "routes"]

log = logging.getLogger("tidings.outbox")

Route = Callable[[RecordedEvent[Any]], str | None]
"""Which topic a stored event goes to; None keeps it off the brokers."""

_RETRY_FIRST, _RETRY_LONGEST = 0.1, 5.0


def routes(rules: Mapping[str, str] | Iterable[str]) -> Route:
    """A `Route` from rules `pattern -> topic`, the first match winning.

    A pattern matches the event type (`order.placed`, `order.*`, `*`) or, written
    `category:NAME`, the stream category (the stream id before its first `-`: `order-42` is
    in `order`). Rules may also be given as `"pattern=topic"` strings, as the CLI takes them.
    """
    pairs: list[tuple[str, str]] = []
    items = rules.items() if isinstance(rules, Mapping) else (_split(rule) for rule in rules)
    for pattern, topic in items:
        if not pattern or not topic:
            raise ConfigurationError(f"a route needs a pattern and a topic, got {pattern!r}")
        pairs.append((pattern, topic))
    if not pairs:
        raise ConfigurationError("no routes: give at least one pattern=topic rule")

    def route(record: RecordedEvent[Any]) -> str | None:
        category = record.stream_id.split("-", 1)[0]
        for pattern, topic in pairs:
            if pattern.startswith("category:"):
                if fnmatch.fnmatchcase(category, pattern[len("category:") :]):
                    return topic
            elif fnmatch.fnmatchcase(record.type, pattern):
                return topic
        return None

    return route


def _split(rule: str) -> tuple[str, str]:
    pattern, sep, topic = rule.partition("=")
    if not sep:
        raise ConfigurationError(f"a route is written pattern=topic, got {rule!r}")
    return pattern.strip(), topic.strip()


class OutboxRelay:
    """Publish the store's events to brokers, from a checkpoint, under a lease.

    Args:
        store: the event store whose global log is the outbox.
        broker: where the events go (opened by the caller).
        route: which topic each event goes to: a topic name (every event goes there), a
            `Route`, or rules for `routes()`.
        name: the relay's checkpoint and lease name; relays of one name share the work.
        lease: seconds the lease lasts (renewed every third of it).
        owner: this relay's name in the lease table (default: host, pid, a random part).
        batch_size: events read, published and checkpointed together.
    """

    def __init__(
        self,
        store: EventStore,
        broker: BrokerBase,
        route: str | Route | Mapping[str, str] | Iterable[str],
        *,
        name: str = "default",
        lease: float = 5.0,
        owner: str | None = None,
        batch_size: int = 500,
    ) -> None:
        if lease <= 0:
            raise ConfigurationError(f"lease must be a positive number of seconds, not {lease}")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, not {batch_size}")
        if not isinstance(store, StoreBase):
            raise ConfigurationError(f"an outbox relay needs a tidings store, not {store!r}")
        self.store = store
        self.broker = broker
        if isinstance(route, str):
            route = {"*": route}
        self.route: Route = route if callable(route) else routes(route)
        self.name = name
        self.checkpoint = f"outbox:{name}"
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid7().hex[-8:]}"
        self.batch_size = batch_size
        self.published = 0  # events this relay published (re-publishes after a crash count)
        self.leased = False
        self._moved = False  # the checkpoint moved since the last retry began
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OutboxRelay:
        """Relay in the background until the block ends (`async with relay:`)."""
        self._task = asyncio.create_task(self.run(), name=f"tidings outbox {self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        task, self._task = self._task, None
        if task is not None:
            await task

    async def position(self) -> int:
        """The checkpoint: every event up to this position has been published."""
        state = await self.store.projection_state(self.checkpoint)
        return 0 if state is None else state.position

    def stop(self) -> None:
        """Ask `run` to return (or not to start). A batch not yet confirmed goes out again
        next time, under the same ids."""
        self._stopping.set()

    async def run(self) -> None:
        """Relay until `stop()` or cancellation, while holding the lease."""
        store, ttl = self.store, self.lease
        try:
            while not self._stopping.is_set():
                if not await self._acquire():
                    await self._pause(ttl / 3)
                    continue
                self.leased = True
                log.info("%s holds the outbox lease %s", self.owner, self.checkpoint)
                following = asyncio.create_task(self._follow(None))
                stopping = asyncio.create_task(self._stopping.wait())
                try:
                    while not following.done():
                        await asyncio.wait(
                            {following, stopping},
                            timeout=ttl / 3,
                            return_when=asyncio.FIRST_COMPLETED,  # stop() wakes it at once
                        )
                        if following.done():
                            break
                        if self._stopping.is_set() or not await self._acquire():
                            if not self._stopping.is_set():
                                log.warning("%s lost the outbox lease", self.owner)
                            break
                finally:
                    self.leased = False
                    for task in (following, stopping):
                        if not task.done():
                            task.cancel()  # an unconfirmed batch goes out again, same ids
                    await asyncio.gather(following, stopping, return_exceptions=True)
                if following.done() and not following.cancelled() and following.exception():
                    raise following.exception()  # type: ignore[misc]
        finally:
            self.leased = False
            self._stopping.clear()  # it can run again
            if not store._closed:
                await asyncio.shield(self._release())

    async def catch_up(self) -> int:
        """Publish everything stored so far (no lease: for one relay, tests and scripts);
        returns the checkpoint reached."""
        head = await self.store.last_position()
        await self._follow(head)
        return await self.position()

    # -- the work ---------------------------------------------------------------------------

    async def _follow(self, until: int | None) -> None:
        """Publish batches from the checkpoint on (up to `until`); store errors are retried."""
        delay = _RETRY_FIRST
        while True:
            self._moved = False
            try:
                await self._relay(until)
                return
            except StoreClosed:
                return
            except ProjectionConflict as exc:  # another relay moved the checkpoint: reload
                log.info("outbox %s: %s; reloading the checkpoint", self.name, exc)
            except (TidingsError, OSError) as exc:  # a locked or lost database, a broker down
                if self._moved:  # it worked since the last failure: a new outage
                    delay = _RETRY_FIRST
                log.warning("outbox %s: %s; retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_LONGEST)

    async def _relay(self, until: int | None) -> None:
        state = await self.store.projection_state(self.checkpoint)
        generation, after = (1, 0) if state is None else (state.generation, state.position)
        if until is not None and after >= until:
            return
        batches = self.store.subscribe_batches(after, limit=self.batch_size)
        try:
            async for batch, scanned_to in batches:
                by_topic: dict[str, list[RecordedEvent[Any]]] = {}
                for record in batch:
                    if until is not None and record.position > until:
                        break
                    topic = self.route(record)
                    if topic is not None:
                        by_topic.setdefault(topic, []).append(record)
                for topic, records in by_topic.items():
                    await self.broker.publish_records(topic, records)
                    self.published += len(records)
                reached = scanned_to if until is None else min(scanned_to, until)
                await self.store.commit_projection(self.checkpoint, generation, after, reached, {})
                after, self._moved = reached, True
                if (until is not None and after >= until) or self._stopping.is_set():
                    return
        finally:
            await batches.aclose()  # type: ignore[attr-defined]

    async def _acquire(self) -> bool:
        try:
            return await self.store.acquire_lease(self.checkpoint, self.owner, self.lease)
        except (TidingsError, OSError) as exc:
            log.warning("outbox %s: cannot renew the lease: %s", self.name, exc)
            return False

    async def _release(self) -> None:
        try:
            await self.store.release_lease(self.checkpoint, self.owner)
        except (TidingsError, OSError) as exc:
            log.debug("outbox %s: cannot release the lease: %s", self.name, exc)

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass
