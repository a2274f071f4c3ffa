"""Server faults mid-load (issue 10): PostgreSQL, Redis, NATS JetStream and RabbitMQ are
restarted while the whole pipeline runs, and the links to them are cut, refused and stalled by
a loopback TCP proxy. The system must recover by itself, within a stated bound, and lose
nothing.

Two pipelines carry the load:

- The store pipeline (PostgreSQL under fault): writers append (an append that raised is
  retried with the same events, which the store makes safe); a plain subscriber follows the
  global log (resubscribing after its last position when the store fails); a
  `ProjectionRunner` keeps a read model; an `OutboxRelay` publishes every event to an
  in-memory broker, where a `Service` applies each behind a SQLite inbox. Afterwards every
  acknowledged append is in the log, the subscriber saw every position once and in order, the
  read model equals a replay of the log, and every event had exactly one effect.
- The broker pipeline (a broker under fault): writers append to a SQLite store, an
  `OutboxRelay` publishes to the broker, a publisher publishes directly (retrying a publish
  that raised, same event); a `Service` consumes behind a SQLite inbox. Afterwards every
  acknowledged publish and every stored event had exactly one effect.

Recovery: each fault ends at a moment (the server is back and answering, or the link is
restored); from there the test waits until each part of the pipeline (writer, subscriber,
projection, relay, publisher, consumer) has done something that worked, fails if one has not
within `RECOVER_BOUND`, and reports the slowest. The consumer counts only once it applied an
event made after that moment (what it had buffered does not show it reaches the broker), so
its time is end to end: published, delivered and applied. Every single append and publish is bounded
too (`OPERATION_BOUND`): a hang fails the test.

Private servers (PostgreSQL cluster, Redis, NATS) run on free loopback ports and are removed
afterwards; RabbitMQ is the shared node, whose application is stopped and started
(`rabbitmqctl`), its queues deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.backends import POSTGRES, RABBITMQ, discard, require
from tests.reliability.harness import Row, reliability, report, scale, stopwatch
from tests.reliability.servers import (
    LinkProxy,
    PrivatePostgres,
    PrivateServer,
    RabbitApp,
    private_server,
)
from tests.store.tcp_proxy import server_of, through
from tidings import (
    Event,
    JSONCodec,
    OutboxRelay,
    Projection,
    ProjectionRunner,
    ReadModel,
    RecordedEvent,
    Service,
    TidingsError,
    TypeRegistry,
    on,
    open_broker,
    open_inbox,
    open_store,
)
from tidings.brokers import BrokerBase
from tidings.store.base import StoreBase

pytestmark = [
    reliability,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="starts and signals local servers"),
]

RESTARTS = scale(2, 10)
RABBIT_RESTARTS = scale(1, 5)
LINK_FAULTS = scale(5, 50)
# Seconds from the server's return (or the link's) to every part working again: the longest
# pause between a store follower's retries (5 s), plus the relay's lease check (a third of
# its 5 s lease), plus reconnecting, with room for a busy machine.
RECOVER_BOUND = 10.0
OPERATION_BOUND = 30.0  # seconds one append or publish may take, faults included
DRAIN_BOUND = 60.0  # seconds for the followers to finish the backlog after the load stops
OUTAGES = (1.0, 3.0)  # seconds a server stays down (3 s outlasts the clients' own retries)
DWELL = 0.5  # seconds of load between recovering from one fault and the next fault
REFUSE = 1.0  # seconds the proxy refuses new connections after a cut
STALL = 1.0  # seconds the proxy swallows the server's answers before the link is cut
# A link stalled for good (no reset ever comes) is the client's to notice: each is set to
# give up on a silent link after about this long (query_timeout, socket_timeout, pings,
# heartbeats), well within RECOVER_BOUND.
SILENCE = {
    "postgres": "query_timeout=2",
    "redis": "socket_timeout=2",
    "nats": "ping_interval=1",
    "rabbitmq": "heartbeat=1",
}
RETRY = 0.05  # seconds a writer or publisher waits before trying a failed call again
STREAMS = 20
GROUP = "faults"

REGISTRY = TypeRegistry()
CODEC = JSONCodec(REGISTRY)


class Tick(Event, type="faults.tick", registry=REGISTRY):
    """One unit of load: a number unique in the test and an amount to sum."""

    n: int
    amount: int


class Totals(Projection, name="fault_totals"):
    """Per stream: how many events and their sum (compared with a replay at the end)."""

    @on(Tick)
    def ticked(self, event: Tick, record: RecordedEvent[Any]) -> None:
        document = self.view.get(record.stream_id, {"count": 0, "sum": 0})
        self.view.put(
            record.stream_id,
            {"count": document["count"] + 1, "sum": document["sum"] + event.amount},
        )


# -- recovery ------------------------------------------------------------------------------


class Recovery:
    """When each part of the pipeline first worked again after the last restore."""

    def __init__(self, parts: Iterable[str]) -> None:
        self.parts = tuple(parts)
        self.restored_at: float | None = None
        self.first: dict[str, float] = {}
        self.times: list[float] = []  # per fault: the slowest part's time
        self.worst: dict[str, float] = dict.fromkeys(self.parts, 0.0)
        self.drawn: Callable[[], int] = lambda: 0  # the last event number the load drew
        self.floor = 0  # events numbered below were made before the restore

    def ok(self, part: str, n: int | None = None) -> None:
        """`part` just did something that worked (with event `n`: it counts only if the
        event was made after the restore, so a consumer's buffered backlog does not count)."""
        late = n is None or n >= self.floor
        if self.restored_at is not None and part not in self.first and late:
            self.first[part] = time.monotonic()

    def broken(self) -> None:
        """A fault begins: nothing counts until `restored`."""
        self.restored_at = None

    def restored(self) -> None:
        """The server is back (answering), or the link is restored: the clock starts."""
        self.first = {}
        self.floor = self.drawn() + 1
        self.restored_at = time.monotonic()

    async def wait(
        self, what: str, watch: Iterable[asyncio.Task[Any]], *, count: bool = True
    ) -> float:
        """Wait until every part has worked since `restored`; the slowest part's time."""
        assert self.restored_at is not None
        started = self.restored_at
        while not all(part in self.first for part in self.parts):
            check_running(watch, what)
            if time.monotonic() - started > RECOVER_BOUND:
                stuck = [part for part in self.parts if part not in self.first]
                pytest.fail(f"{what}: {', '.join(stuck)} not working {RECOVER_BOUND}s later")
            await asyncio.sleep(0.005)
        took = {part: self.first[part] - started for part in self.parts}
        self.restored_at = None
        slowest = max(took.values())
        if count:
            self.times.append(slowest)
            for part, seconds in took.items():
                self.worst[part] = max(self.worst[part], seconds)
        return slowest

    def summary(self) -> str:
        return ", ".join(f"{part} {seconds:.2f}s" for part, seconds in self.worst.items())


def check_running(tasks: Iterable[asyncio.Task[Any]], what: str) -> None:
    """Fail at once if a task that should run until cancelled has ended."""
    for task in tasks:
        if task.done():
            failure = None if task.cancelled() else task.exception()
            pytest.fail(f"{task.get_name()} ended during {what}: {failure!r}")


async def stop_tasks(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], Awaitable[bool]], what: str, watch: Iterable[Any]) -> None:
    """Wait (up to `DRAIN_BOUND`) for `condition`; store errors while checking are retried."""
    deadline = time.monotonic() + DRAIN_BOUND
    while True:
        check_running(watch, what)
        with contextlib.suppress(TidingsError):
            if await condition():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DRAIN_BOUND}s: {what}")
        await asyncio.sleep(0.05)


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """What the writers and publishers put in, and how it went."""

    recovery: Recovery
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count())
    drawn: int = -1
    appended: dict[uuid.UUID, int] = field(default_factory=dict)  # acknowledged: id -> n
    published: dict[uuid.UUID, int] = field(default_factory=dict)  # acknowledged: id -> n
    appends_failed: int = 0
    publishes_failed: int = 0
    hangs: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.recovery.drawn = lambda: self.drawn

    def tick(self) -> Tick:
        n = self.drawn = next(self.numbers)
        return Tick(n=n, amount=n % 97 + 1)

    async def write(self, store: StoreBase, w: int, part: str, pace: float) -> None:
        """Append 1-5 events at a time until `stop`; an append that raised goes again with
        the same events until it is acknowledged."""
        i = 0
        while not self.stop.is_set():
            events = [self.tick() for _ in range(1 + (w + i) % 5)]
            stream = f"tick-{(w * 7 + i) % STREAMS}"
            while True:
                try:
                    async with asyncio.timeout(OPERATION_BOUND):
                        await store.append(stream, events)
                    break
                except TidingsError:
                    self.appends_failed += 1
                except TimeoutError:
                    self.hangs.append(f"an append to {stream} took over {OPERATION_BOUND}s")
                await asyncio.sleep(RETRY)
            self.appended.update((e.event_id, e.n) for e in events)
            self.recovery.ok(part)
            i += 1
            await asyncio.sleep(pace)

    async def publish(self, broker: BrokerBase, topic: str, pace: float) -> None:
        """Publish one event at a time (half keyed, on four keys) until `stop`; a publish
        that raised goes again, same event, until it is acknowledged."""
        while not self.stop.is_set():
            event = self.tick()
            key = f"k{event.n % 4}" if event.n % 2 == 0 else None
            while True:
                try:
                    async with asyncio.timeout(OPERATION_BOUND):
                        await broker.publish(topic, event, key=key)
                    break
                except TidingsError:
                    self.publishes_failed += 1
                except TimeoutError:
                    self.hangs.append(f"a publish to {topic} took over {OPERATION_BOUND}s")
                await asyncio.sleep(RETRY)
            self.published[event.event_id] = event.n
            self.recovery.ok("publisher")
            await asyncio.sleep(pace)


def watch_commits(store: StoreBase, recovery: Recovery) -> None:
    """Tell `recovery` each time a projection or the relay commits a checkpoint (the relay
    commits only after the broker confirmed what it published)."""
    real = store.commit_projection

    async def commit(name: str, *args: Any, **kwargs: Any) -> None:
        await real(name, *args, **kwargs)
        recovery.ok("relay" if name.startswith("outbox:") else "projection")

    store.commit_projection = commit  # type: ignore[method-assign]


class Effects:
    """A service applying every event of a topic behind a SQLite inbox: one row per effect,
    with no key, so an event applied twice shows as two rows."""

    def __init__(self, folder: Path, broker: BrokerBase, topic: str, recovery: Recovery | None):
        self.path = folder / "consumer.db"
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("pragma journal_mode=wal")
            conn.execute("create table effects (event_id text, n int)")
        self.inbox = open_inbox(f"sqlite:///{self.path}")
        self.service = Service("consumer", broker, registry=REGISTRY)

        @self.service.handler(topic, group=GROUP, inbox=self.inbox)
        async def apply(event: Tick, ctx: Any) -> None:
            ctx.db.execute("insert into effects values (?, ?)", (str(event.event_id), event.n))
            await asyncio.sleep(0.002)  # a handler that takes a moment: faults land in it too
            if recovery is not None:
                recovery.ok("consumer", event.n)  # an event made after the restore

    def rows(self) -> list[tuple[str, int]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return conn.execute("select event_id, n from effects").fetchall()

    def distinct(self) -> int:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return int(conn.execute("select count(distinct event_id) from effects").fetchone()[0])


def effect_counts(effects: Effects, expected: dict[uuid.UUID, int]) -> tuple[set[str], int]:
    """(ids expected but never applied, effects beyond the first); fails on a stranger."""
    counts = Counter(event_id for event_id, _ in effects.rows())
    wanted = {str(i): n for i, n in expected.items()}
    strangers = [i for i in counts if i not in wanted]
    assert not strangers, f"effects of events nobody put in: {strangers[:5]}"
    wrong = [(i, n) for i, n in effects.rows() if wanted[i] != n]
    assert not wrong, f"effects whose event arrived changed: {wrong[:5]}"
    return set(wanted) - set(counts), sum(c - 1 for c in counts.values())


# -- the store pipeline (PostgreSQL under fault) -------------------------------------------

STORE_PARTS = ("writer", "subscriber", "projection", "relay")


@dataclass
class Verdict:
    events_in: int
    events_out: int
    lost: int
    duplicated: int
    notes: str


class Pipeline:
    """What both pipelines share: their tasks, a warm-up before the first fault, stopping."""

    recovery: Recovery
    load: Load
    tasks: list[asyncio.Task[Any]]  # the followers: relay, consumer, projection, subscriber
    writing: list[asyncio.Task[Any]]  # the load

    @property
    def watched(self) -> list[asyncio.Task[Any]]:
        return [*self.tasks, *self.writing]

    @contextlib.asynccontextmanager
    async def warmed_up(self) -> AsyncIterator[None]:
        """Every part works once before any fault; on the way out, every task stops."""
        try:
            self.recovery.restored()
            await self.recovery.wait("the start", self.watched, count=False)
            yield
        finally:
            self.load.stop.set()
            await stop_tasks(*self.writing, *self.tasks)

    async def writers_done(self) -> None:
        """Stop the load and wait for its last calls."""
        self.load.stop.set()
        async with asyncio.timeout(OPERATION_BOUND * 2):
            await asyncio.gather(*self.writing)


class StorePipeline(Pipeline):
    """Writers, a subscriber, a projection and an outbox relay on one store; the relay
    publishes to an in-memory broker, where a service applies each event behind an inbox."""

    def __init__(self, store: StoreBase, folder: Path, writers: int, pace: float) -> None:
        self.store = store
        self.folder = folder
        self.recovery = Recovery(STORE_PARTS)
        self.load = Load(self.recovery)
        self.writers, self.pace = writers, pace
        self.seen: list[int] = []  # positions the subscriber got, in order
        self.resubscribed = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.writing: list[asyncio.Task[Any]] = []

    async def follow(self) -> None:
        after = 0
        while True:
            try:
                async for record in self.store.subscribe(after):
                    self.seen.append(record.position)
                    after = record.position
                    self.recovery.ok("subscriber")
            except TidingsError:
                self.resubscribed += 1
                await asyncio.sleep(RETRY)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StorePipeline]:
        watch_commits(self.store, self.recovery)
        async with open_broker("memory://", codec=CODEC) as bus:
            await bus.declare("ticks", GROUP)
            self.effects = Effects(self.folder, bus, "ticks", None)
            self.runner = ProjectionRunner(self.store, [Totals()], batch_size=200)
            self.relay = OutboxRelay(self.store, bus, "ticks", name="faults", batch_size=200)
            self.tasks = [
                asyncio.create_task(self.effects.service.run(), name="the inbox consumer"),
                asyncio.create_task(self.runner.run(), name="the projection runner"),
                asyncio.create_task(self.relay.run(), name="the outbox relay"),
                asyncio.create_task(self.follow(), name="the subscriber"),
            ]
            self.writing = [
                asyncio.create_task(
                    self.load.write(self.store, w, "writer", self.pace), name=f"writer {w}"
                )
                for w in range(self.writers)
            ]
            async with self.warmed_up():
                yield self

    async def finish(self) -> Verdict:
        """Stop the load, let every follower catch up, and compare each with the log."""
        await self.writers_done()
        store, watch = self.store, self.tasks
        head = 0

        async def read_head() -> bool:
            nonlocal head
            head = await store.last_position()
            return True

        await until(read_head, "reading the head of the log", watch)
        await until(
            lambda: _true(bool(self.seen) and self.seen[-1] >= head), "the subscriber", watch
        )
        await until(lambda: _at(store, Totals.name, head), "the projection", watch)
        await until(lambda: _at(store, "outbox:faults", head), "the relay", watch)
        log: list[RecordedEvent[Any]] = []

        async def read_log() -> bool:
            log[:] = [record async for record in store.read_all()]
            return True

        await until(read_log, "reading the log", watch)
        await until(lambda: _true(self.effects.distinct() >= len(log)), "the inbox consumer", watch)
        await stop_tasks(*self.tasks)

        # 1. every acknowledged append is in the log, once
        in_log = Counter(record.id for record in log)
        lost_ids = {str(i) for i in self.load.appended if i not in in_log}
        duplicated = sum(c - 1 for c in in_log.values())
        strangers = [r.id for r in log if r.id not in self.load.appended]
        assert not strangers, f"events in the log nobody acknowledged: {strangers[:5]}"
        # 2. the subscriber saw every position once, in order
        positions = [record.position for record in log]
        assert all(a < b for a, b in itertools.pairwise(self.seen)), (
            "the subscriber saw positions out of order or twice"
        )
        by_position = {record.position: str(record.id) for record in log}
        lost_ids |= {by_position[p] for p in set(positions) - set(self.seen)}
        duplicated += len(self.seen) - len(set(self.seen))
        assert set(self.seen) <= set(positions), "the subscriber saw positions not in the log"
        # 3. the read model equals a replay of the log
        replay: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "sum": 0})
        for record in log:
            replay[record.stream_id]["count"] += 1
            replay[record.stream_id]["sum"] += record.event.amount
        model = await ReadModel(store, Totals).all()
        model_lost = sum(
            max(0, r["count"] - model.get(s, {"count": 0})["count"]) for s, r in replay.items()
        )
        model_twice = sum(
            max(0, m["count"] - replay.get(s, {"count": 0})["count"]) for s, m in model.items()
        )
        duplicated += model_twice
        if not model_lost and not model_twice:
            assert model == dict(replay), "the read model differs from a replay of the log"
        # 4. the relay published everything, and each event had one effect behind the inbox
        missing, twice = effect_counts(self.effects, {r.id: r.event.n for r in log})
        lost_ids |= missing
        duplicated += twice
        notes = (
            f"{len(self.seen)} positions seen once and in order by a subscriber "
            f"({self.resubscribed} resubscriptions); read model = replay of {len(replay)} "
            f"streams; relay published {self.relay.published} (re-publishes included); "
            f"{self.load.appends_failed} appends raised and went again; "
            f"slowest recovery: {self.recovery.summary()}"
        )
        return Verdict(
            len(self.load.appended),
            self.effects.distinct(),
            len(lost_ids) + model_lost,
            duplicated,
            notes,
        )


async def _true(value: bool) -> bool:
    return value


async def _at(store: StoreBase, checkpoint: str, head: int) -> bool:
    state = await store.projection_state(checkpoint)
    return state is not None and state.position >= head


# -- the broker pipeline (a broker under fault) ---------------------------------------------

BROKER_PARTS = ("relay", "publisher", "consumer")


class BrokerPipeline(Pipeline):
    """Writers on a SQLite store, an outbox relay from it to the broker, a publisher
    straight to the broker, and a service consuming behind a SQLite inbox."""

    def __init__(self, url: str, folder: Path, pace: float) -> None:
        self.url = url
        self.folder = folder
        self.pace = pace
        self.topic = f"faults-{uuid.uuid4().hex[:10]}"
        self.recovery = Recovery(BROKER_PARTS)
        self.load = Load(self.recovery)
        self.tasks: list[asyncio.Task[Any]] = []
        self.writing: list[asyncio.Task[Any]] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BrokerPipeline]:
        async with (
            open_store(f"sqlite:///{self.folder / 'events.db'}", codec=CODEC) as store,
            open_broker(self.url, codec=CODEC) as publisher,
            open_broker(self.url, codec=CODEC) as consumer,
        ):
            assert isinstance(store, StoreBase)
            self.store = store
            watch_commits(store, self.recovery)
            await publisher.declare(self.topic, GROUP)
            self.effects = Effects(self.folder, consumer, self.topic, self.recovery)
            self.relay = OutboxRelay(store, publisher, self.topic, name="faults", batch_size=100)
            self.tasks = [
                asyncio.create_task(self.effects.service.run(), name="the inbox consumer"),
                asyncio.create_task(self.relay.run(), name="the outbox relay"),
            ]
            self.writing = [
                asyncio.create_task(
                    self.load.write(store, 0, "writer", self.pace), name="the writer"
                ),
                asyncio.create_task(
                    self.load.publish(publisher, self.topic, self.pace), name="the publisher"
                ),
            ]
            async with self.warmed_up():
                yield self

    async def finish(self) -> Verdict:
        await self.writers_done()
        store, watch = self.store, self.tasks
        head = await store.last_position()
        await until(lambda: _at(store, "outbox:faults", head), "the relay", watch)
        expected = self.load.appended | self.load.published
        await until(
            lambda: _true(self.effects.distinct() >= len(expected)), "the inbox consumer", watch
        )
        await stop_tasks(*self.tasks)
        stored = {record.id async for record in store.read_all()}
        assert stored == set(self.load.appended), "the SQLite store lost or gained events"
        missing, twice = effect_counts(self.effects, expected)
        notes = (
            f"{len(self.load.appended)} via the outbox relay (published "
            f"{self.relay.published}, re-publishes included), {len(self.load.published)} "
            f"published directly ({self.load.publishes_failed} publishes raised and went "
            f"again); slowest recovery: {self.recovery.summary()}"
        )
        return Verdict(len(expected), self.effects.distinct(), len(missing), twice, notes)


# -- faults --------------------------------------------------------------------------------


async def inject(
    faults: int,
    fault: Callable[[int], Awaitable[str]],
    recovery: Recovery,
    watch: Callable[[], list[asyncio.Task[Any]]],
) -> dict[str, list[float]]:
    """Run `faults` faults one after another, load running: each `fault(i)` breaks something,
    mends it, calls `recovery.restored()` at the moment it is mended, and names its kind.
    Returns the recovery times by kind."""
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(faults):
        await asyncio.sleep(DWELL)
        check_running(watch(), "the load")
        recovery.broken()
        kind = await fault(i)
        times[kind].append(await recovery.wait(f"recovering from {kind} #{i + 1}", watch()))
    return times


def outage(i: int) -> float:
    """The outage of fault `i`: with `i % 2` choosing the way down, the first four faults
    try each way with each outage."""
    return OUTAGES[(i + i // 2) % 2]


def described(times: dict[str, list[float]]) -> str:
    return "; ".join(f"{len(t)}x {kind} (recovered ≤ {max(t):.2f}s)" for kind, t in times.items())


def check_hangs(load: Load) -> None:
    assert not load.hangs, f"{len(load.hangs)} operations hung: {load.hangs[:3]}"


# -- 1. PostgreSQL restarted mid-load ------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster (created, not started), removed after the test."""
    cluster = PrivatePostgres()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.destroy()


async def test_postgres_restarted_mid_load(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    cluster = private_postgres
    await cluster.start()
    url = f"{cluster.url}?schema=faults&connect_timeout=3"
    with stopwatch() as took:
        async with open_store(url, codec=CODEC) as store:
            assert isinstance(store, StoreBase)
            pipeline = StorePipeline(store, tmp_path, writers=3, pace=0.02)
            async with pipeline.running():

                async def restart(i: int) -> str:
                    mode = ("fast", "immediate")[i % 2]
                    await cluster.stop(mode)
                    await asyncio.sleep(outage(i))
                    await cluster.start()
                    pipeline.recovery.restored()
                    return f"stop -m {mode}, {outage(i):g}s down"

                times = await inject(RESTARTS, restart, pipeline.recovery, lambda: pipeline.watched)
                verdict = await pipeline.finish()
    check_hangs(pipeline.load)
    report(
        Row(
            scenario="PostgreSQL restarted mid-load",
            backend="PostgreSQL (private cluster) + memory broker",
            load=f"{len(pipeline.load.appended):,} events by 3 writers on {STREAMS} streams; "
            "a subscriber, a projection, an outbox relay to an inbox consumer",
            faults=f"{RESTARTS} restarts: {described(times)}",
            events_in=verdict.events_in,
            events_out=verdict.events_out,
            lost=verdict.lost,
            duplicated=verdict.duplicated,
            recover_seconds=max(pipeline.recovery.times),
            notes=f"bound {RECOVER_BOUND:g}s; " + verdict.notes,
            seconds=took[0],
        )
    )


# -- 2-4. a broker restarted mid-load ------------------------------------------------------

BROKERS = {"redis": "Redis", "nats": "NATS JetStream", "rabbitmq": "RabbitMQ"}
RABBIT_URL = f"{RABBITMQ.rstrip('/')}/?queue_type=quorum&expires=300"


async def delete_rabbit_topic(url: str, topic: str) -> None:
    """Remove a test topic's queues and exchange from the shared RabbitMQ node."""
    import aio_pika

    from tidings.brokers.rabbitmq import RabbitMQBroker, _name

    broker = RabbitMQBroker.from_url(url)
    connection = await aio_pika.connect(broker.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for route in broker._routes():
            await channel.queue_delete(_name(topic, GROUP, route))
        await channel.exchange_delete(_name(topic))


@pytest.fixture
def rabbit_app() -> Iterator[RabbitApp]:
    """The shared RabbitMQ node's application, started again if a test left it stopped."""
    require("rabbitmq")
    parts = urlsplit(RABBITMQ)
    app = RabbitApp(parts.hostname or "127.0.0.1", parts.port or 5672)
    try:
        yield app
    finally:
        app.ensure_up()


@pytest.mark.parametrize("backend", list(BROKERS))
async def test_broker_restarted_mid_load(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require(backend)
    async with contextlib.AsyncExitStack() as stack:
        server: PrivateServer | None = None
        app: RabbitApp | None = None
        if backend == "rabbitmq":
            app = request.getfixturevalue("rabbit_app")
            url, restarts = RABBIT_URL, RABBIT_RESTARTS
        else:
            server = await stack.enter_async_context(private_server(backend, tmp_path / "server"))
            url, restarts = server.url, RESTARTS
        pipeline = BrokerPipeline(url, tmp_path, pace=0.02)
        if backend == "rabbitmq":
            stack.push_async_callback(delete_rabbit_topic, url, pipeline.topic)

        async def restart(i: int) -> str:
            if app is not None:
                await app.stop()
                await asyncio.sleep(outage(i))
                await app.start()
                kind = "stop_app + start_app"
            else:
                assert server is not None
                crash = i % 2 == 1
                await server.stop(crash=crash)
                await asyncio.sleep(outage(i))
                await server.start()
                kind = "SIGKILL" if crash else "SIGTERM"
            pipeline.recovery.restored()
            return f"{kind}, {outage(i):g}s down"

        with stopwatch() as took:
            async with pipeline.running():
                times = await inject(restarts, restart, pipeline.recovery, lambda: pipeline.watched)
                verdict = await pipeline.finish()
    check_hangs(pipeline.load)
    where = "the shared node" if backend == "rabbitmq" else "a private server"
    report(
        Row(
            scenario=f"{BROKERS[backend]} restarted mid-load",
            backend=f"{BROKERS[backend]} ({where}) + SQLite",
            load=f"{verdict.events_in:,} events: outbox relay and a publisher, an inbox consumer",
            faults=f"{restarts} restarts: {described(times)}",
            events_in=verdict.events_in,
            events_out=verdict.events_out,
            lost=verdict.lost,
            duplicated=verdict.duplicated,
            recover_seconds=max(pipeline.recovery.times),
            notes=f"bound {RECOVER_BOUND:g}s; " + verdict.notes,
            seconds=took[0],
        )
    )


# -- 5. connections cut, refused and stalled -----------------------------------------------


async def link_fault(proxy: LinkProxy, i: int, recovery: Recovery) -> str:
    """Cut every connection; or cut them and refuse new ones for a while (the proxy's port
    closed, as when the server is not there); or swallow the server's answers for a while (it
    still runs every request, the client hears nothing), then cut the stalled links; or
    stall every link for good, both ways, and never cut it: the clients must notice."""
    kind = ("cut", "cut + refused", "stall + cut", "stalled for good")[i % 4]
    if kind == "stalled for good":
        proxy.stall()  # the clock starts now: noticing the silence is part of recovering
        recovery.restored()
        return kind
    if kind == "cut":
        proxy.cut()
    elif kind == "cut + refused":
        await proxy.close_port()
        proxy.cut()
        await asyncio.sleep(REFUSE)
        await proxy.open_port()
    else:
        proxy.muted = True
        await asyncio.sleep(STALL)
        proxy.refusing = True  # the stalled links go; no new one is made while muted
        proxy.cut()
        proxy.muted = False
        proxy.refusing = False
    recovery.restored()
    return kind


@pytest.mark.parametrize("backend", ["postgres", *BROKERS])
async def test_connections_cut_and_stalled(backend: str, tmp_path: Path) -> None:
    require(backend)
    async with contextlib.AsyncExitStack() as stack:
        direct = {"postgres": POSTGRES, "rabbitmq": RABBIT_URL}.get(backend, "")
        name = {"postgres": "PostgreSQL", "rabbitmq": "RabbitMQ (the shared node)"}.get(backend)
        if not direct:
            server = await stack.enter_async_context(private_server(backend, tmp_path / "server"))
            direct, name = server.url, f"{BROKERS[backend]} (a private server)"
        proxy = await stack.enter_async_context(LinkProxy(*server_of(direct)))
        pipeline: StorePipeline | BrokerPipeline
        if backend == "postgres":
            schema = f"{direct}?schema=faults_{uuid.uuid4().hex[:12]}"
            stack.callback(discard, schema)  # straight to the server, after the store closed
            store = await stack.enter_async_context(
                open_store(
                    f"{through(schema, proxy.port)}&connect_timeout=3&{SILENCE[backend]}",
                    codec=CODEC,
                )
            )
            assert isinstance(store, StoreBase)
            pipeline = StorePipeline(store, tmp_path, writers=3, pace=0.02)
            between = "the store and PostgreSQL"
        else:
            url = through(direct, proxy.port)
            url += ("&" if "?" in url else "?") + SILENCE[backend]
            pipeline = BrokerPipeline(url, tmp_path, pace=0.02)
            if backend == "rabbitmq":
                stack.push_async_callback(delete_rabbit_topic, direct, pipeline.topic)
            between = "the broker clients and the broker"

        async def fault(i: int) -> str:
            return await link_fault(proxy, i, pipeline.recovery)

        with stopwatch() as took:
            async with pipeline.running():
                times = await inject(
                    LINK_FAULTS, fault, pipeline.recovery, lambda: pipeline.watched
                )
                verdict = await pipeline.finish()
    check_hangs(pipeline.load)
    report(
        Row(
            scenario=f"Connections cut, refused and stalled between {between}",
            backend=f"{name}" + (" + memory broker" if backend == "postgres" else " + SQLite"),
            load=f"{verdict.events_in:,} events"
            + (
                " by 3 writers; a subscriber, a projection, an outbox relay to an inbox consumer"
                if backend == "postgres"
                else ": outbox relay and a publisher, an inbox consumer"
            ),
            faults=f"{LINK_FAULTS} link faults through a TCP proxy: {described(times)}; "
            f"refused {REFUSE:g}s, stalled {STALL:g}s; clients given up on silence by "
            f"{SILENCE[backend]}",
            events_in=verdict.events_in,
            events_out=verdict.events_out,
            lost=verdict.lost,
            duplicated=verdict.duplicated,
            recover_seconds=max(pipeline.recovery.times),
            notes=f"bound {RECOVER_BOUND:g}s; " + verdict.notes,
            seconds=took[0],
        )
    )
