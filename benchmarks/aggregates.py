"""Scenario 5: loading an aggregate with snapshots costs about the same at any stream length.

One SQLite file (WAL, synchronous=FULL) holds two `Account` streams saved through
`Repository(..., snapshot_every=100)`: a long one (100,000 events in a full run) and a short one
(100 events). Both end on a multiple of 100, so each has a snapshot at its head and a load reads
the snapshot and the (empty) tail. The long stream is built with saves of 1,000 events; each
save crosses a multiple of 100 and so writes a snapshot.

The loads are timed in blocks, the two streams taking turns (which goes first alternates), after
a warm-up; the figure per side is the median of its blocks' mean load time, and the ratio is
long / short (target: at most 2x).

The benchmark domain (`BENCH`, `Opened`, `Deposited`, `Account`) lives here and is shared with
scenarios 6-8. Its event types sit in a private registry, so they never clash with the default
one's.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlite_store import Measured
from tidings import (
    Aggregate,
    Event,
    EventStore,
    JSONCodec,
    Repository,
    TypeRegistry,
    on,
    open_store,
)

Advance = Callable[[int], None]

BENCH = TypeRegistry()


class Opened(Event, type="bench.opened", registry=BENCH):
    owner: str


class Deposited(Event, type="bench.deposited", registry=BENCH):
    amount: int


class Account(Aggregate):
    """An account: opened once, then deposits. Stream id `account-<id>`."""

    owner: str = ""
    balance: int = 0

    @classmethod
    def open(cls, account_id: str, owner: str) -> Account:
        account = cls(account_id)
        account.record(Opened(owner=owner))
        return account

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount=amount))

    @on(Opened)
    def _opened(self, event: Opened) -> None:
        self.owner = event.owner

    @on(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.amount


def url(path: str) -> str:
    return "sqlite:///" + path  # an absolute path gives the four-slash form


def bench_store(path: str, **options: Any) -> EventStore:
    """The store every scenario from 5 on uses: the benchmark codec, synchronous=FULL, WAL."""
    options.setdefault("synchronous", "full")
    return open_store(url(path), codec=JSONCodec(BENCH), **options)


def drop(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def fresh(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    drop(path)
    return path


def amount(i: int) -> int:
    """A deterministic deposit, so every side can check the balance it loads."""
    return 1 + (i * 7919) % 1000


def expected_balance(deposits: int) -> int:
    return sum(amount(i) for i in range(deposits))


async def _build(
    repo: Repository[Account], account_id: str, events: int, save_every: int, advance: Advance
) -> None:
    """`events` events (one Opened, then deposits), saved `save_every` at a time."""
    account = Account.open(account_id, "bench")
    pending = 1
    for i in range(events - 1):
        account.deposit(amount(i))
        pending += 1
        if pending == save_every:
            await repo.save(account)
            advance(pending)
            pending = 0
    if pending:
        await repo.save(account)
        advance(pending)


def _snapshot_rows(path: str) -> dict[str, int]:
    """Snapshot rows per stream in the file (tidings keeps one per save that crossed 100)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT stream_id, count(*) FROM tidings_snapshots GROUP BY stream_id"
        ).fetchall()
    finally:
        conn.close()
    return {str(stream): int(count) for stream, count in rows}


async def _measure(
    path: str,
    long_events: int,
    short_events: int,
    snapshot_every: int,
    loads: int,
    block: int,
    advance_build: Advance,
    advance_load: Advance,
) -> Measured:
    long_id, short_id = "long", "short"
    async with bench_store(path) as store:
        repo = Repository(store, Account, snapshot_every=snapshot_every)
        await _build(repo, short_id, short_events, short_events, advance_build)
        await _build(repo, long_id, long_events, 1000, advance_build)

    snapshots = _snapshot_rows(path)
    for account_id in (long_id, short_id):
        if not snapshots.get(f"{Account.__category__}-{account_id}"):
            raise SystemExit(f"scenario 5: no snapshot of {account_id} was saved: {snapshots}")

    # Load from a freshly opened store, as a service that restarts would.
    async with bench_store(path) as store:
        repo = Repository(store, Account, snapshot_every=snapshot_every)
        for account_id, events in ((long_id, long_events), (short_id, short_events)):
            account = await repo.get(account_id)
            want = expected_balance(events - 1)
            if account.balance != want or account.owner != "bench":
                raise SystemExit(
                    f"scenario 5: {account_id} loaded with balance {account.balance}, "
                    f"expected {want}"
                )

        async def timed(account_id: str, count: int) -> float:
            get = repo.get
            start = time.perf_counter()
            for _ in range(count):
                await get(account_id)
            return (time.perf_counter() - start) / count * 1000  # ms per load

        warm = max(10, block // 2)
        await timed(long_id, warm)
        await timed(short_id, warm)
        gc.collect()
        per_block: dict[str, list[float]] = {long_id: [], short_id: []}
        for number in range(max(1, loads // block)):
            order = (long_id, short_id) if number % 2 == 0 else (short_id, long_id)
            for account_id in order:
                per_block[account_id].append(await timed(account_id, block))
            advance_load(2 * block)

    measured = Measured(
        tidings=per_block[long_id],
        raw=per_block[short_id],
        info={
            "long_stream_events": long_events,
            "short_stream_events": short_events,
            "snapshot_every": snapshot_every,
            "long_stream_saved_in": f"saves of {min(1000, long_events)} events",
            "snapshot_rows_per_stream": snapshots,
            "loads_per_side": len(per_block[long_id]) * block,
            "loads_per_block": block,
            "warm_up_loads_per_side": warm,
            "figure": "median over blocks of the mean ms per load",
            "ms_per_load_median": {
                "long": statistics.median(per_block[long_id]),
                "short": statistics.median(per_block[short_id]),
            },
        },
    )
    return measured


def aggregate_load(
    directory: str,
    long_events: int,
    loads: int,
    advance_build: Advance,
    advance_load: Advance,
    short_events: int = 100,
    snapshot_every: int = 100,
    block: int = 100,
) -> Measured:
    """Scenario 5: ms per load of a `long_events` stream and of a `short_events` one."""
    path = fresh(directory, "s5-aggregates.db")
    try:
        return asyncio.run(
            _measure(
                path,
                long_events,
                short_events,
                snapshot_every,
                loads,
                block,
                advance_build,
                advance_load,
            )
        )
    finally:
        drop(path)
