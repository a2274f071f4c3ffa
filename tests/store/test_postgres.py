"""What only the PostgreSQL store has: out-of-order commits, LISTEN/NOTIFY, lost connections,
schemas. The event store contract itself is tests/conformance/test_store.py, which runs here too.

Each test works in fresh schemas of the server in `tests.backends` and drops them afterwards;
the server being absent skips these tests (fails them under TIDINGS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import asyncio
import random
import sys
import textwrap
import time
import traceback
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
import pytest

import tidings
from tests.backends import POSTGRES
from tests.events import Deposited, Note
from tests.store.tcp_proxy import TcpProxy, server_of, through
from tidings import (
    AppendResult,
    ConfigurationError,
    Event,
    RecordedEvent,
    StoreError,
    StoreNotFound,
    WrongExpectedVersion,
)
from tidings.core.codec import TAG_SEPARATOR, JSONCodec
from tidings.store import postgres
from tidings.store.postgres import PostgresEventStore
from tidings.store.postgres.append import _locks

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]


def schema_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["schema"]


@asynccontextmanager
async def raw_connection() -> AsyncIterator[Any]:
    """A plain asyncpg connection to the test server, beside the store's pool."""
    conn = await asyncpg.connect(POSTGRES)
    try:
        yield conn
    finally:
        await conn.close()


async def raw_append(conn: Any, url: str, stream_id: str, events: list[Event]) -> int:
    """Append through the store's SQL function on `conn` (in whatever transaction it has open),
    as another writer would; returns the last position drawn."""
    encoded = [JSONCodec().encode(event, index) for index, event in enumerate(events)]
    locks, exclusive = _locks(schema_of(url), encoded, None)
    ok, _version, position = await conn.fetchrow(
        f'SELECT ok, version, last_position FROM "{schema_of(url)}".tidings_append('
        "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        stream_id.encode(),  # stream ids are UTF-8 bytea; a raw connection has no codec for it
        -1,  # ANY
        [e.id for e in encoded],
        [e.type for e in encoded],
        [e.schema_version for e in encoded],
        [e.data for e in encoded],
        None,
        [TAG_SEPARATOR.join(e.tags) or None for e in encoded],
        locks,
        exclusive,
        None,
        0,
    )
    assert ok
    return int(position)


async def until(
    condition: Callable[[], bool], timeout: float, what: str, watch: Iterable[Any] = ()
) -> float:
    """Wait for `condition` (checked every 5 ms); fail naming `what` after `timeout` seconds,
    or at once with its error if a `watch`ed consumer task ends. Returns the seconds taken."""
    start = time.monotonic()
    while not condition():
        for task in watch:
            if task.done():
                failure = task.exception()
                pytest.fail(f"a consumer ended while waiting for {what}: {described(failure)}")
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def described(failure: BaseException | None) -> str:
    """An error and where it was raised, in one line: failing with a plain message keeps
    pytest from formatting the task's traceback, which on CPython 3.11.7 can end the whole
    session with "AST constructor recursion depth mismatch" (cpython#106905)."""
    if failure is None:
        return "no error"
    where = traceback.extract_tb(failure.__traceback__)
    return f"{failure!r}" + (f" at {where[-1].filename}:{where[-1].lineno}" if where else "")


def follow(store: tidings.EventStore, into: list[RecordedEvent[Any]], after: int = 0) -> Any:
    """A task collecting everything `store.subscribe(after)` delivers into `into`."""

    async def run() -> None:
        async for record in store.subscribe(after):
            into.append(record)

    return asyncio.create_task(run())


def poll(store: tidings.EventStore, into: list[RecordedEvent[Any]]) -> Any:
    """A task that re-reads `read_all(after=checkpoint)` every 10 ms, as a polling consumer."""

    async def run() -> None:
        checkpoint = 0
        while True:
            async for record in store.read_all(after=checkpoint):
                into.append(record)
                checkpoint = record.position
            await asyncio.sleep(0.01)

    return asyncio.create_task(run())


async def stop(*tasks: Any) -> None:
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:  # a consumer that died early must fail the test, not vanish
        if not isinstance(result, asyncio.CancelledError):
            pytest.fail(f"a consumer task ended with {described(result)}")


def count_reads(store: tidings.EventStore) -> list[float]:
    """Record the time of every global-log read the store makes from now on."""
    assert isinstance(store, PostgresEventStore)
    calls: list[float] = []
    real = store._read_all_batch

    async def counted(*args: Any) -> Any:
        calls.append(time.monotonic())
        return await real(*args)

    store._read_all_batch = counted  # type: ignore[method-assign]
    return calls


def positions(records: list[RecordedEvent[Any]]) -> list[int]:
    return [r.position for r in records]


async def read_all(store: tidings.EventStore, after: int = 0) -> list[RecordedEvent[Any]]:
    return [r async for r in store.read_all(after=after)]


def assert_same_log(got: list[RecordedEvent[Any]], log: list[RecordedEvent[Any]]) -> None:
    """`got` holds exactly the events of `log`, in its order; a failure names the first
    difference instead of diffing thousands of events."""
    pairs = [(r.position, r.id) for r in got]
    expected = [(r.position, r.id) for r in log]
    if pairs != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(pairs, expected, strict=False)) if a != b),
            min(len(pairs), len(expected)),
        )
        pytest.fail(
            f"{len(pairs)} events where the log has {len(expected)}; first difference at "
            f"index {at}: {pairs[at : at + 3]} where the log has {expected[at : at + 3]}"
        )


# -- many writers, one contested stream, subscribers following ------------------------------


async def test_a_pool_of_one_connection_serves_concurrent_callers_and_closes(
    pg_url: str,
) -> None:
    """With `max_size=1` no connection is kept out of the pool: it once was, and then
    concurrent callers and the notifier waited for the pool's one connection for ever (the
    bound here is a deadlock's, far above the milliseconds this takes)."""
    async with asyncio.timeout(30):
        async with tidings.open_store(pg_url, max_size=1) as store:
            await asyncio.gather(
                *(store.append(f"note-{n}", [Note(text=str(n))]) for n in range(20))
            )
            assert await store.last_position() == 20


async def test_concurrent_writers_contested_stream_and_subscribers(pg_url: str) -> None:
    """16 writers over a pool of 4 connections append 20,000 events to 100 shared streams,
    while 4 racers fight over one stream with expected versions and 2 subscribers follow."""
    total, writers, streams = 20_000, 16, 100
    racers, wins_each = 4, 50
    async with tidings.open_store(pg_url, min_size=4, max_size=4) as store:
        appended: list[tuple[str, list[UUID], AppendResult]] = []
        seen: list[list[RecordedEvent[Any]]] = [[], []]
        subscribers = [follow(store, into) for into in seen]

        async def write(w: int) -> None:
            done, i = 0, 0
            while done < total // writers:
                size = min(1 + i % 9, total // writers - done)  # 1..9 events an append
                stream = f"s-{(w * 7 + i) % streams}"  # streams are shared between writers
                events = [Note(text=f"{w}.{done + k}") for k in range(size)]
                result = await store.append(stream, events)
                appended.append((stream, [e.event_id for e in events], result))
                done, i = done + size, i + 1

        attempts = conflicts = 0
        won: list[tuple[int, UUID]] = []  # (version, event id) of every successful race

        async def race(r: int) -> None:
            nonlocal attempts, conflicts
            wins = 0
            while wins < wins_each:
                assert attempts < 100_000, "the contested stream made no progress"
                attempts += 1
                version = await store.stream_version("contested")
                event = Deposited(amount=r * 1000 + wins)
                try:
                    result = await store.append("contested", [event], expected_version=version)
                except WrongExpectedVersion as clash:
                    assert (clash.stream_id, clash.expected) == ("contested", version)
                    assert clash.actual > version
                    conflicts += 1
                    continue
                assert result.version == version + 1
                won.append((result.version, event.event_id))
                appended.append(("contested", [event.event_id], result))
                wins += 1

        started = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(write(w) for w in range(writers)), *(race(r) for r in range(racers))),
            timeout=60,
        )
        committed = total + racers * wins_each
        await until(
            lambda: min(map(len, seen)) >= committed,
            20,
            "the subscribers got every event",
            subscribers,
        )
        await asyncio.sleep(0.2)  # anything delivered twice would arrive now
        await stop(*subscribers)
        elapsed = time.monotonic() - started
        log = await read_all(store)

    # each subscriber saw every committed event once, in strictly increasing positions
    ids = {event_id for _, event_ids, _ in appended for event_id in event_ids}
    assert len(ids) == len(log) == committed
    assert {r.id for r in log} == ids
    for records in seen:
        assert all(a.position < b.position for a, b in pairwise(records))
        assert_same_log(records, log)
    # every append's result names the stream version and position of its last event
    where = {r.id: r for r in log}
    for stream, event_ids, result in appended:
        records = [where[event_id] for event_id in event_ids]
        assert {r.stream_id for r in records} == {stream}
        assert [r.version for r in records] == list(
            range(result.version - len(records) + 1, result.version + 1)
        )
        assert records[-1].position == result.position
    # every stream holds versions 1..n, in log order
    versions: dict[str, list[int]] = defaultdict(list)
    for record in log:
        versions[record.stream_id].append(record.version)
    assert len(versions) == streams + 1
    for stream_versions in versions.values():
        assert stream_versions == list(range(1, len(stream_versions) + 1))
    # the contested stream: one winner per version, no gap, every loser told so
    assert sorted(won) == [(r.version, r.id) for r in log if r.stream_id == "contested"]
    assert [version for version, _ in sorted(won)] == list(range(1, racers * wins_each + 1))
    assert attempts == racers * wins_each + conflicts
    assert conflicts > 0, "the racers never clashed: the test did not test the clash"
    assert elapsed < 45, f"took {elapsed:.1f}s"


# -- out-of-order commits: a reader never passes a position still in flight ------------------


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_reader_waits_at_an_uncommitted_position(pg_url: str, outcome: str) -> None:
    async with tidings.open_store(pg_url) as store, raw_connection() as conn:
        await store.append("before", [Note(text="1"), Note(text="2")])
        subscribed: list[RecordedEvent[Any]] = []
        polled: list[RecordedEvent[Any]] = []
        consumers = [follow(store, subscribed), poll(store, polled)]
        await until(lambda: len(subscribed) == len(polled) == 2, 5, "both caught up", consumers)

        held = Note(text="held")
        transaction = conn.transaction()
        await transaction.start()
        assert await raw_append(conn, pg_url, "held", [held]) == 3  # drawn, not committed
        later = [Note(text=str(i)) for i in range(4, 7)]
        for event in later:  # they commit first, with higher positions
            await store.append("after", [event])
        # The newest position everything below which is readable: the open hole holds it
        # back (a DCB decision reading up to it must not miss position 3 when it commits).
        assert await store.last_position() == 2

        await asyncio.sleep(1.0)  # consumers keep looking while the hole is open
        assert positions(subscribed) == positions(polled) == [1, 2]
        assert await read_all(store, after=2) == []
        assert positions(await read_all(store)) == [1, 2]
        async with tidings.open_store(pg_url) as fresh:  # a reader that never saw the hole
            assert positions(await read_all(fresh)) == [1, 2]

        if outcome == "commit":
            await transaction.commit()
            expected = [1, 2, 3, 4, 5, 6]
        else:
            await transaction.rollback()
            expected = [1, 2, 4, 5, 6]
        took = await until(
            lambda: len(subscribed) >= len(expected) and len(polled) >= len(expected),
            5,
            f"the consumers got past the {outcome}",
            consumers,
        )
        await store.append("after", [Note(text="7")])
        expected.append(7)
        assert await store.last_position() == 7  # the hole is settled: held back no more
        await until(
            lambda: len(subscribed) == len(polled) == len(expected), 5, "the last event", consumers
        )
        await asyncio.sleep(0.1)  # anything delivered twice would arrive now
        await stop(*consumers)
        assert positions(subscribed) == positions(polled) == expected
        assert positions(await read_all(store)) == expected
        assert (held.event_id in {r.id for r in subscribed}) == (outcome == "commit")
        assert [r.id for r in subscribed] == [r.id for r in polled]
        assert took < 3, f"{took:.2f}s to get past the {outcome}"


async def test_a_hole_drawn_above_the_snapshot_xmax_stays_open(pg_url: str) -> None:
    """The guard trap: a running writer's xid may be at or above `pg_snapshot_xmax` of the
    reader's snapshot (the last *completed* xid + 1). Here L < A < W take xids in that order,
    W draws a position, L draws the next and commits: a guard of xmax would be at most W's
    xid, so once A ends the hole would look closed while W still runs, and W's event would be
    skipped for good.

    The trap is armed only if no transaction newer than W ends before the reader looks, so on
    a busy server the scenario is repeated until it was (checked afterwards); on a quiet one
    (CI) the first round is."""
    async with (
        tidings.open_store(pg_url) as store,
        raw_connection() as l_conn,
        raw_connection() as a_conn,
        raw_connection() as w_conn,
        raw_connection() as admin,
    ):
        for attempt in range(20):
            base = await store.last_position()
            xids, transactions = {}, {}
            for name, conn in (("L", l_conn), ("A", a_conn), ("W", w_conn)):
                transactions[name] = conn.transaction()
                await transactions[name].start()
                xids[name] = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
            assert await raw_append(w_conn, pg_url, f"w{attempt}", [Note(text="w")]) == base + 1
            assert await raw_append(l_conn, pg_url, f"l{attempt}", [Note(text="l")]) == base + 2
            await transactions["L"].commit()
            assert await read_all(store, base) == []  # it sees the hole and keeps a guard
            xmax = int(await admin.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
            await transactions["A"].commit()
            assert await read_all(store, base) == [], "the hole was closed while its writer ran"
            await transactions["W"].commit()
            assert [r.stream_id for r in await read_all(store, base)] == [
                f"w{attempt}",
                f"l{attempt}",
            ]
            if xmax <= xids["W"]:  # a guard of xmax, taken before, would have been below W
                break


async def test_random_commits_and_rollbacks_reach_every_consumer_once(pg_url: str) -> None:
    """Writers on raw connections hold their transactions a random while, then commit or roll
    back, while the store appends too: consumers get exactly the committed events, in order."""
    rng = random.Random(4)
    plan = [[rng.random() < 0.5 for _ in range(6)] for _ in range(8)]  # commit? per transaction
    committed: set[UUID] = set()
    async with (
        tidings.open_store(pg_url) as store,
        tidings.open_store(pg_url, listen=False) as other,
    ):
        subscribed: list[RecordedEvent[Any]] = []
        polled: list[RecordedEvent[Any]] = []
        consumers = [follow(store, subscribed), poll(other, polled)]

        async def raw_writer(c: int, outcomes: list[bool]) -> None:
            async with raw_connection() as conn:
                for t, commit in enumerate(outcomes):
                    events: list[Event] = [Note(text=f"{c}.{t}.{k}") for k in range(1 + t % 3)]
                    transaction = conn.transaction()
                    await transaction.start()
                    await raw_append(conn, pg_url, f"raw-{c}", events)
                    await asyncio.sleep(rng.uniform(0, 0.08))
                    if commit:
                        await transaction.commit()
                        committed.update(e.event_id for e in events)
                    else:
                        await transaction.rollback()

        async def store_writer() -> None:
            for i in range(100):
                event = Note(text=f"store.{i}")
                await store.append(f"store-{i % 5}", [event])
                committed.add(event.event_id)
                await asyncio.sleep(rng.uniform(0, 0.005))

        await asyncio.gather(
            *(raw_writer(c, outcomes) for c, outcomes in enumerate(plan)),
            store_writer(),
        )
        await until(
            lambda: len(subscribed) >= len(committed) and len(polled) >= len(committed),
            10,
            "the consumers got every committed event",
            consumers,
        )
        await asyncio.sleep(0.1)
        await stop(*consumers)
        log = await read_all(store)
    assert {r.id for r in log} == committed
    for records in (subscribed, polled):
        assert_same_log(records, log)
    assert any(not commit for outcomes in plan for commit in outcomes)


async def test_readers_of_one_store_meeting_a_closing_hole_at_once(pg_url: str) -> None:
    """Several readers of one store (subscribers, read-aheads) find the same hole closed at the
    same moment: each gets past it once, none fails."""
    async with (
        tidings.open_store(pg_url, min_size=8, max_size=8) as store,
        raw_connection() as conn,
    ):
        transaction = conn.transaction()
        await transaction.start()
        assert await raw_append(conn, pg_url, "held", [Note(text="held")]) == 1
        await store.append("after", [Note(text="2")])
        assert await read_all(store) == []  # the hole at 1 is seen, its guard kept
        await transaction.rollback()
        for _ in range(250):  # until every transaction older than the guard has ended
            results = await asyncio.gather(
                *(read_all(store) for _ in range(8)), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    pytest.fail(f"a reader failed: {described(result)}")
            if all(results):
                break
            await asyncio.sleep(0.02)
        assert [positions(result) for result in results] == [[2]] * 8


async def test_a_hole_seen_once_does_not_keep_idle_subscribers_polling(pg_url: str) -> None:
    async with tidings.open_store(pg_url) as store, raw_connection() as conn:
        transaction = conn.transaction()
        await transaction.start()
        assert await raw_append(conn, pg_url, "held", [Note(text="held")]) == 1
        await store.append("after", [Note(text="2")])
        assert await read_all(store) == []  # a one-off read stops at the hole
        await transaction.commit()  # and nobody reads that part of the log again

        seen: list[RecordedEvent[Any]] = []
        subscriber = follow(store, seen, after=2)
        reads = count_reads(store)
        await listening(store)
        assert await idle_reads(reads) <= 2, "an idle subscriber polls for an old hole"
        await store.append("later", [Note(text="3")])
        await until(lambda: len(seen) == 1, 5, "the next event", [subscriber])
        await stop(subscriber)


# -- LISTEN/NOTIFY: woken at once from anywhere, no polling while idle, reconnecting ------------

APPENDER = """
    import asyncio, sys, time
    import tidings
    from tests.events import Note

    async def main():
        async with tidings.open_store(sys.argv[1], listen=False) as store:
            for i in range(int(sys.argv[2])):
                await asyncio.sleep(0.3)
                await store.append("remote", [Note(text=str(i))])
                print(time.time(), flush=True)

    asyncio.run(main())
"""


async def listening(store: tidings.EventStore, timeout: float = 5) -> int:
    """Wait until the store's listener is up; its server process id."""
    assert isinstance(store, PostgresEventStore)
    await until(lambda: store._listening, timeout, "the store listens")
    assert store._listener is not None
    return int(store._listener.get_server_pid())


async def idle_reads(reads: list[float], seconds: float = 1.0) -> int:
    await asyncio.sleep(0.2)  # settle: the reads that delivered the last event are done
    before = len(reads)
    await asyncio.sleep(seconds)
    return len(reads) - before


async def test_idle_subscriber_is_woken_by_another_process(pg_url: str) -> None:
    count = 3
    async with tidings.open_store(pg_url) as store:
        seen: list[RecordedEvent[Any]] = []
        arrived: list[float] = []

        async def run() -> None:
            async for record in store.subscribe():
                seen.append(record)
                arrived.append(time.time())

        subscriber = asyncio.create_task(run())
        reads = count_reads(store)
        await listening(store)
        assert await idle_reads(reads) <= 2, "an idle subscriber polls"

        before = len(reads)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(APPENDER),
            pg_url,
            str(count),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        await until(lambda: len(seen) == count, 5, "the remote events arrived", [subscriber])
        during = len(reads) - before
        await stop(subscriber)

    committed = [float(line) for line in out.decode().split()]
    assert [r.stream_id for r in seen] == ["remote"] * count
    latencies = [got - sent for got, sent in zip(arrived, committed, strict=True)]
    assert max(latencies) < 0.5, f"latencies {latencies}"
    # woken once per event (a read that gets it, one that finds nothing more), not polling
    # through the second or so the other process took to start and append
    assert during <= 2 * count + 2, f"{during} reads while another process appended {count}"


async def test_listener_killed_by_the_server_reconnects(pg_url: str) -> None:
    async with (
        tidings.open_store(pg_url) as store,
        tidings.open_store(pg_url, listen=False) as other,
        raw_connection() as admin,
    ):
        assert isinstance(store, PostgresEventStore)
        seen: list[RecordedEvent[Any]] = []
        subscriber = follow(store, seen)
        reads = count_reads(store)
        pid = await listening(store)
        listeners = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query = $1",
            f'LISTEN "tidings_{schema_of(pg_url)}"',
        )
        assert [row["pid"] for row in listeners] == [pid]
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

        await other.append("meanwhile", [Note(text="1"), Note(text="2")])
        await until(
            lambda: len(seen) == 2, 5, "events appended while the listener died", [subscriber]
        )
        await until(
            lambda: store._listening and store._listener.get_server_pid() != pid,
            5,
            "a new listener",
        )
        assert await idle_reads(reads) <= 2, "an idle subscriber polls after the reconnect"
        await other.append("after", [Note(text="3")])
        took = await until(lambda: len(seen) == 3, 5, "an event after the reconnect", [subscriber])
        await stop(subscriber)
    assert took < 0.5
    assert [r.position for r in seen] == [1, 2, 3]


async def test_subscriber_polls_while_the_listener_cannot_reconnect(pg_url: str) -> None:
    async with TcpProxy(*server_of(POSTGRES)) as proxy:
        # The pool's two connections are made at open; only the listener must reconnect.
        proxied = through(pg_url, proxy.port)
        async with (
            tidings.open_store(proxied, min_size=2, max_size=2) as store,
            tidings.open_store(pg_url, listen=False) as other,
            raw_connection() as admin,
        ):
            assert isinstance(store, PostgresEventStore)
            seen: list[RecordedEvent[Any]] = []
            subscriber = follow(store, seen)
            reads = count_reads(store)
            pid = await listening(store)
            proxy.refusing = True
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await until(lambda: not store._listening, 5, "the store notices the lost listener")

            await other.append("while-deaf", [Note(text="1")])
            await until(
                lambda: len(seen) == 1,
                3,
                "the event reached the subscriber by polling",
                [subscriber],
            )
            assert not store._listening
            assert await idle_reads(reads) >= 3, "no listener, yet the subscriber did not poll"

            proxy.refusing = False
            await listening(store, timeout=10)  # back by itself, with its retry backoff
            assert await idle_reads(reads) <= 2, "an idle subscriber polls after the reconnect"
            await other.append("after", [Note(text="2")])
            took = await until(
                lambda: len(seen) == 2, 5, "an event after the reconnect", [subscriber]
            )
            await stop(subscriber)
    assert took < 0.5
    assert [r.stream_id for r in seen] == ["while-deaf", "after"]


async def test_links_stalled_for_good_are_dropped_after_the_query_timeout(pg_url: str) -> None:
    """Every connection goes silent both ways and is never reset (a NAT that forgot it): an
    append fails over to a new connection, and the listener is replaced, each within about
    `query_timeout`, instead of waiting for ever."""
    async with TcpProxy(*server_of(POSTGRES)) as proxy:
        proxied = through(pg_url, proxy.port)
        async with (
            tidings.open_store(proxied, query_timeout=1) as store,
            tidings.open_store(pg_url, listen=False) as other,
        ):
            seen: list[RecordedEvent[Any]] = []
            subscriber = follow(store, seen)
            deaf = await listening(store)
            await store.append("before", [Note(text="1")])
            await until(lambda: len(seen) == 1, 5, "the first event", [subscriber])

            assert proxy.stall() >= 2  # the pool's connection and the listener
            started = time.monotonic()
            async with asyncio.timeout(10):  # without query_timeout: for ever
                await store.append("after", [Note(text="2")])  # on a new connection
            appended = time.monotonic() - started
            await until(lambda: len(seen) == 2, 5, "the event appended over the stall")
            await until(
                lambda: store._listening and store._listener.get_server_pid() != deaf,  # type: ignore[union-attr]
                5,
                "a new listener in place of the silent one",
            )
            await other.append("from-another", [Note(text="3")])
            woken = await until(lambda: len(seen) == 3, 5, "an event from another store")
            await stop(subscriber)
    assert 0.9 < appended < 4, f"the append took {appended:.2f}s"
    assert woken < 1, "woken by the safety poll, not by the new listener"
    assert [r.stream_id for r in seen] == ["before", "after", "from-another"]


# -- bad input: no server, a silent server, connections lost mid-append ------------------------


async def test_server_down_at_start_is_a_store_error_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1\b"):
        async with tidings.open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2"):
            pass
    assert time.monotonic() - started < 3.5


async def test_silent_server_is_a_store_error_within_the_connect_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)
        await reader.read()  # until the client gives up
        w.close()

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"127\.0\.0\.1:{port}\b"):
            async with tidings.open_store(
                f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=1
            ):
                pass
        took = time.monotonic() - started
    finally:
        server.close()
        for w in accepted:  # the client may have given up a moment before its handler noticed
            w.transport.abort()
        await server.wait_closed()
    assert 0.5 < took < 3, f"gave up after {took:.2f}s"


async def test_appends_cut_off_mid_flight_are_safe_to_retry(pg_url: str) -> None:
    """Every connection is cut while appends are in flight, after the server committed some of
    them but before their answers got back: each append returns or raises StoreError, and
    retrying the failed ones with the same events stores every event exactly once."""
    batches = [
        (f"s-{i % 20}", [Note(text=f"{i}.{k}") for k in range(1 + i % 3)]) for i in range(400)
    ]
    outcomes: list[AppendResult | StoreError | None] = [None] * len(batches)
    async with TcpProxy(*server_of(POSTGRES)) as proxy:
        proxied = through(pg_url, proxy.port)
        async with tidings.open_store(proxied, max_size=4, connect_timeout=2) as store:

            async def append(i: int) -> None:
                stream, events = batches[i]
                try:
                    outcomes[i] = await store.append(stream, events)
                except StoreError as exc:  # anything else fails the test
                    outcomes[i] = exc

            appends = asyncio.gather(*(append(i) for i in range(len(batches))))
            await until(lambda: sum(o is not None for o in outcomes) >= 50, 10, "50 appends")
            proxy.muted = True  # the server still commits, its answers are lost
            await asyncio.sleep(0.2)
            proxy.refusing = True  # the store's own retry cannot reconnect either
            assert proxy.cut() > 0
            await asyncio.sleep(0.5)
            proxy.refusing = proxy.muted = False
            await asyncio.wait_for(appends, 30)
            assert all(o is not None for o in outcomes)
            failed = [i for i, o in enumerate(outcomes) if isinstance(o, StoreError)]
            assert failed, "no append failed: the cut came too late"
            for i in failed:
                assert "retry it with the same events" in str(outcomes[i])

            stored_before = {r.id for r in await read_all(store)}
            lost_answers = [i for i in failed if batches[i][1][0].event_id in stored_before]
            assert lost_answers, "no append committed without its answer: the test missed that"
            for i in failed:  # the application's retry: the same event instances
                outcomes[i] = await store.append(*batches[i])
            log = await read_all(store)

    where = {r.id: r for r in log}
    assert len(where) == len(log) == sum(len(events) for _, events in batches)
    for (stream, events), result in zip(batches, outcomes, strict=True):
        assert isinstance(result, AppendResult)
        records = [where[e.event_id] for e in events]
        assert {r.stream_id for r in records} == {stream}
        assert (records[-1].version, records[-1].position) == (result.version, result.position)
    versions: dict[str, list[int]] = defaultdict(list)
    for record in log:
        versions[record.stream_id].append(record.version)
    for stream_versions in versions.values():
        assert stream_versions == list(range(1, len(stream_versions) + 1))


# -- the schema= option ----------------------------------------------------------------------


async def test_schemas_of_one_database_are_isolated(new_url: Callable[[], str]) -> None:
    a_url, b_url = new_url(), new_url()
    async with tidings.open_store(a_url) as a, tidings.open_store(b_url) as b:
        await a.append("shared-name", [Note(text="a1"), Note(text="a2")])
        await b.append("shared-name", [Note(text="b1")])
        assert [(r.position, r.event.text) for r in await read_all(a)] == [(1, "a1"), (2, "a2")]
        assert [(r.position, r.event.text) for r in await read_all(b)] == [(1, "b1")]
        versions = [await store.stream_version("shared-name") for store in (a, b)]
        assert versions == [2, 1]
        assert (await a.last_position(), await b.last_position()) == (2, 1)

        seen: list[RecordedEvent[Any]] = []
        subscriber = follow(a, seen, after=2)
        reads = count_reads(a)
        await listening(a)
        await asyncio.sleep(0.2)
        before = len(reads)
        for i in range(20):  # other schemas' appends neither reach nor wake it
            await b.append("b-only", [Note(text=str(i))])
        await asyncio.sleep(0.5)
        assert (seen, len(reads) - before) == ([], 0)
        await a.append("a-only", [Note(text="a3")])
        await until(lambda: len(seen) == 1, 5, "its own schema's event", [subscriber])
        await stop(subscriber)
        assert [r.event.text for r in seen] == ["a3"]
        assert [s.stream_id async for s in b.streams()] == ["b-only", "shared-name"]


async def test_stores_opening_one_new_schema_at_once_all_succeed(
    new_url: Callable[[], str],
) -> None:
    migrations = [version for version, _ in postgres._migrations("x")]
    for _ in range(3):
        url = new_url()
        stores = [tidings.open_store(url) for _ in range(5)]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.open() for s in stores)), 30)
            results = await asyncio.gather(
                *(s.append(f"s-{i}", [Note(text=str(i))]) for i, s in enumerate(stores))
            )
            assert sorted(r.position for r in results) == [1, 2, 3, 4, 5]
            for s in stores:
                assert await s.last_position() == 5
        finally:
            await asyncio.gather(*(s.aclose() for s in stores))
        async with raw_connection() as conn:
            applied = await conn.fetch(
                f'SELECT version FROM "{schema_of(url)}".tidings_schema ORDER BY version'
            )
        assert [row["version"] for row in applied] == migrations


async def test_create_false_never_creates_a_schema(pg_url: str) -> None:
    schema = schema_of(pg_url)
    with pytest.raises(StoreNotFound, match=schema):
        async with tidings.open_store(pg_url, create=False):
            pass
    async with raw_connection() as conn:
        assert await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema) is None
    async with tidings.open_store(pg_url) as store:
        await store.append("s", [Note(text="x")])
    async with tidings.open_store(f"{pg_url}&create=false") as reader:
        assert [r.event.text for r in await read_all(reader)] == ["x"]


@pytest.mark.parametrize("bad", ["Upper", "has-dash", "1digit", "x" * 64, "", 'q"uote'])
def test_bad_schema_names_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="schema"):
        tidings.open_store(f"{POSTGRES}?schema={bad}")
